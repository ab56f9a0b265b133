"""Kill `dvc repro` at any moment, resume it, lose nothing (issue "Reliability", point 5).

The reduced demo of test_pipeline (its overrides, scenario 1) runs twice in throwaway repositories,
as `make demo` runs it (under skinaug.prefork's warm process; SKINAUG_TEST_COLD=1 runs it cold):
once straight through, noting the CPU time of each stage's command, and once killed with SIGKILL
(the whole process group: the warm process, DVC and the stage's `skinaug`; the forked command,
in a group of its own, must die with its `skinaug`) once inside each stage kind (images copy,
textual inversion, LoRA, generation, a classifier, the report) and resumed with `dvc repro` after
each kill. Each kill's moment is drawn by a seeded generator, uniformly over the CPU time the
straight run's commands of that kind used (CPU time, unlike wall time, hardly depends on how busy
the machine is; a command that ends before its moment is killed as it ends, while DVC records the
stage). In the end `dvc status` is clean, dvc.lock and every output file equal the straight run's
byte for byte (timing is kept out of every output for this), and no temp, partial or lock file is
left in the workspace.

Checkpoints every step (textual_inversion/lora.checkpoint_every, speed-only settings that no stage
declares, so dvc.lock is unchanged) give a kill inside textual inversion or LoRA a checkpoint to
resume from; the reduced classifiers train one epoch, so theirs restart (test_classifiers checks
their resume). About 3 minutes on 2 idle CPU cores (twice the reduced demo, and a restart per
kill); `pytest -s` prints what each kill hit and how each resumed run went on.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dvcrepo import DVC, OUTPUT_DIRS, OVERRIDES, WARM, Repo, make_repo

pytestmark = pytest.mark.slow

SEED = 10  # of the kill moments
REPRO_TIMEOUT_S = 1800  # a guard on one whole reduced `dvc repro` (about 1 min on 2 idle cores)
GONE_S = 30  # a killed run's processes go in a moment: its fork dies with its `skinaug` (skinaug.prefork)
KILL_OVERRIDES = [*OVERRIDES, "scenario=1", "textual_inversion.checkpoint_every=1", "lora.checkpoint_every=1"]
KINDS = {  # stage kind -> the stage names of that kind
    "images": r"images",
    "textual_inversion": r"(ablation_)?textual_inversion@.+",
    "lora": r"(ablation_)?lora(_plain)?@.+",
    "generate": r"(ablation_)?generate@.+",
    "classify": r"(ablation_)?classify(_real)?@.+",
    "report": r"report",
}
STAGE = re.compile(r"Running stage '([^']+)'")
RESUMED = re.compile(r"resuming from \S+|generate: \d+ images \(\d+ new\)|holds images of other settings|"
                     r"images: \d+ of \d+ available in \S+ \(\d+ already there|had been killed")


class Repro:
    """`dvc repro` in a session of its own; its log, read as it grows, with the time each stage started."""

    def __init__(self, repo: Repo, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([*WARM, *DVC, "repro"], cwd=repo.path, env=repo.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.start, self.read, self.text = time.monotonic(), 0, ""
        self.stages: list[tuple[float, str]] = []  # (seconds from the start, name) as each stage starts

    def poll(self) -> bool:
        """Read the log's new lines; True while dvc runs."""
        running = self.proc.poll() is None
        with open(self.log, "rb") as f:
            f.seek(self.read)
            new = f.read()
        lines = new[: new.rfind(b"\n") + 1]  # whole lines only: a stage's line may be half written
        self.read += len(lines)
        done = lines.decode(errors="replace")
        self.text += done
        self.stages += [(time.monotonic() - self.start, name) for name in STAGE.findall(done)]
        return running

    def wait_for_stage(self, name: str, timeout: float) -> float | None:
        """Seconds from the start at which `name` started (its "Running stage" line); None if dvc ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.poll()
            for t, stage in self.stages:
                if stage == name:
                    return t
            if not running:
                assert self.proc.returncode == 0, self.text[-6000:]
                return None
            time.sleep(0.05)
        pytest.fail(f"stage {name} did not start within {timeout} s:\n{self.text[-4000:]}")

    def _below(self) -> list[psutil.Process]:
        """Every process under the run's first one (DVC, the stage's `skinaug`, the warm process's forks)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # dvc and its stage had ended
            return []

    def _commands(self) -> list[tuple[psutil.Process, str | None]]:
        """The running stage's command: its `skinaug` process with the command's name, and the warm
        process's fork that runs it (None for a name)."""
        found = []
        for child in self._below():
            try:
                words = child.cmdline()
            except psutil.Error:
                continue
            if len(words) > 2 and Path(words[1]).name == "skinaug":  # python .../bin/skinaug <command> ...
                found.append((child, words[2]))
            elif words[1:3] == ["-m", "skinaug.prefork"]:  # a fork of the warm process (self.proc)
                found.append((child, None))
        return found

    def command(self) -> tuple[str, float] | None:
        """The `skinaug` command running under this dvc, if any: its name and the CPU seconds it has used
        (its own and its fork's: under the warm process the fork does the work, cold the command does)."""
        name, cpu = None, 0.0
        for child, called in self._commands():
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            name = called or name
            cpu += times.user + times.system
        return (name, cpu) if name else None

    def kill(self) -> None:
        """SIGKILL the run's process group, then wait until every process of the run is gone: the forked
        command (a group of its own), and DVC under the warm process, whose PID in DVC's lock file makes
        the resumed run refuse to start ("is busy") until the system has reaped it."""
        below = self._below()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # dvc and its stage had ended
            pass
        self.proc.wait(timeout=60)
        _, alive = psutil.wait_procs(below, timeout=GONE_S)
        assert not alive, f"a killed run's processes still run {GONE_S} s later: {alive}"

    def finish(self, timeout: float = REPRO_TIMEOUT_S) -> None:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            self.poll()
        assert self.proc.returncode == 0, self.text[-6000:]


def _leftovers(root: Path) -> list[str]:
    """Temp files, partial work folders and lock files under root (DVC's and git's own folders aside)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d in (".git", ".dvc"))]
        for name in dirs + files:
            if (".tmp" in name or name.endswith((".partial", ".old"))
                    or (name.startswith(".") and name.endswith(".lock"))):
                found.append(str(Path(folder, name).relative_to(root)))
    return sorted(found)


def _what_is_there(repo: Repo) -> str:
    """A short account of what a kill left: work folders (with a checkpoint or not), temp files, images."""
    notes = [f"{path} ({'checkpoint' if (repo.path / path / 'checkpoint.pt').exists() else 'no checkpoint'})"
             if (repo.path / path).is_dir() else path for path in _leftovers(repo.path)]
    for images in sorted((repo.path / "data" / "synthetic").rglob("images")):
        if not (images.parent / "manifest.csv").exists():
            notes.append(f"{images.relative_to(repo.path)}: {len(list(images.glob('[!.]*.png')))} images, no manifest")
    return "; ".join(notes) or "nothing partial"


def _tree(repo: Repo) -> dict[str, bytes]:
    return {str(p.relative_to(repo.path)): p.read_bytes()
            for top in OUTPUT_DIRS for p in sorted((repo.path / top).rglob("*")) if p.is_file()}


@pytest.fixture
def short_tmp():
    """A TMPDIR for the killed run: a killed warm process leaves its socket's folder there (6 kills, 6
    folders), and a socket's path must stay short (about 100 bytes), so not under tmp_path."""
    folder = tempfile.mkdtemp(prefix="skinaug-kill-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_killed_repro_resumes_to_the_uninterrupted_outputs(tmp_path, short_tmp):
    straight = make_repo(tmp_path / "straight")
    straight.compose_params(KILL_OVERRIDES)
    run, cpu = Repro(straight, tmp_path / "straight.log"), {}  # stage -> CPU seconds its command used
    while run.poll():
        command = run.command()
        if command and run.stages:  # the command of the stage the log last named
            cpu[run.stages[-1][1]] = max(cpu.get(run.stages[-1][1], 0.0), command[1])
        time.sleep(0.05)
    run.finish()
    total = time.monotonic() - run.start
    order = [name for _, name in run.stages]

    rng = random.Random(SEED)
    targets = []  # (kind, stage, CPU seconds into its command): one moment of each kind, uniform over
    for kind, pattern in KINDS.items():  # the CPU time the straight run's commands of that kind used
        spans = [(name, cpu.get(name, 0.0)) for name in order if re.fullmatch(pattern, name)]
        assert spans, f"no {kind} stage ran: {order}"
        moment = rng.uniform(0.02, 0.98) * sum(used for _, used in spans)
        for name, used in spans:
            if moment < used:
                break
            moment -= used
        targets.append((kind, name, moment))
    targets.sort(key=lambda target: order.index(target[1]))

    killed = make_repo(tmp_path / "killed")
    killed.env["TMPDIR"] = short_tmp
    killed.compose_params(KILL_OVERRIDES)
    report, started = [], time.monotonic()
    run = Repro(killed, tmp_path / "killed-0.log")
    for n, (kind, name, moment) in enumerate(targets, 1):
        if run.wait_for_stage(name, timeout=REPRO_TIMEOUT_S) is None:
            report.append(f"kill {n}: {kind} stage {name} missed: dvc repro had finished")
            break
        began, seen, command = len(run.stages), False, None
        while run.poll() and len(run.stages) == began:
            command = run.command()
            if command and command[1] >= moment:
                break
            if seen and not command:
                break  # ended before its moment (another machine load, another speed): kill as dvc records it
            seen = seen or bool(command)
            time.sleep(0.02)
        run.kill()
        where = (f"{command[1]:.1f} of its command's {cpu[name]:.1f} CPU s" if command
                 else f"after its command (at {moment:.1f} of {cpu[name]:.1f} CPU s), while dvc records it")
        report.append(f"kill {n}: {kind} stage {name} at {where}; left: {_what_is_there(killed)}")
        run = Repro(killed, tmp_path / f"killed-{n}.log")
    run.finish()
    for n in range(1, len(report) + 1):  # what each resumed run said about the work it found
        log = tmp_path / f"killed-{n}.log"
        said = RESUMED.findall(log.read_text()) if log.exists() else []
        report[n - 1] += f"; resumed: {'; '.join(dict.fromkeys(said)) or 'nothing to say'}"
    report.append(f"straight run {total:.0f} s; killed and resumed {time.monotonic() - started:.0f} s; CPU s of the "
                  "straight run's commands: " + ", ".join(f"{name} {cpu.get(name, 0.0):.1f}" for name in order))
    print("\n".join(report))

    assert killed.status() == set(), "\n".join(report)
    assert _leftovers(killed.path) == [], "\n".join(report)
    lock_straight, lock_killed = (yaml.safe_load((r.path / "dvc.lock").read_text()) for r in (straight, killed))
    differ = [stage for stage in lock_straight["stages"]
              if lock_straight["stages"][stage] != lock_killed["stages"].get(stage)]
    assert not differ, f"dvc.lock differs in {differ}\n" + "\n".join(report)
    files_straight, files_killed = _tree(straight), _tree(killed)
    assert sorted(files_killed) == sorted(files_straight)
    assert [f for f in files_straight if files_straight[f] != files_killed[f]] == []

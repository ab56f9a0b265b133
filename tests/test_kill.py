"""Kill `dvc repro` at any moment, resume it, lose nothing (issue "Reliability", point 5).

The reduced demo of test_pipeline (its overrides, scenario 1) runs twice in throwaway repositories:
once straight through, timing each stage, and once killed with SIGKILL (the whole process group:
DVC and the stage's `skinaug`) once inside each stage kind (images copy, textual inversion, LoRA,
generation, a classifier, the report) and resumed with `dvc repro` after each kill. Which stage of
a kind, and how far into it (a share of its duration in the straight run), is drawn from a seeded
generator. In the end `dvc status` is clean, dvc.lock and every output file equal the straight
run's byte for byte, and no temp, partial or lock file is left in the workspace.

Checkpoints every step (textual_inversion/lora.checkpoint_every, speed-only settings that no stage
declares, so dvc.lock is unchanged) give a kill inside textual inversion or LoRA a checkpoint to
resume from. About 2 x 2.5 minutes plus a restart per kill on 2 idle CPU cores; `pytest -s` prints
what each kill hit.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dvcrepo import DVC, OUTPUT_DIRS, OVERRIDES, Repo, make_repo

pytestmark = pytest.mark.slow

SEED = 5  # of the kill moments
REPRO_TIMEOUT_S = 1800  # a guard on one whole reduced `dvc repro` (about 2.5 min on 2 idle cores)
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
            self.proc = subprocess.Popen([*DVC, "repro"], cwd=repo.path, env=repo.env, stdout=out,
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

    def running_commands(self) -> list[str]:
        """The `skinaug` commands running under this dvc (the stage's own process, if it is running)."""
        found = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # dvc had ended
            return found
        for child in children:
            try:
                words = child.cmdline()
            except psutil.Error:
                continue
            found += [f"skinaug {words[i + 1]}" for i, w in enumerate(words[:2])
                      if Path(w).name == "skinaug" and i + 1 < len(words)]
        return found

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # dvc and its stage had ended
            pass
        self.proc.wait(timeout=60)

    def finish(self, timeout: float = REPRO_TIMEOUT_S) -> None:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            self.poll()
        assert self.proc.returncode == 0, self.text[-6000:]


def _durations(run: Repro) -> dict[str, tuple[float, float]]:
    """Stage -> (start, duration): from its "Running stage" line to the next one (or dvc's end)."""
    ends = [t for t, _ in run.stages[1:]] + [time.monotonic() - run.start]
    return {name: (t, end - t) for (t, name), end in zip(run.stages, ends)}


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


def test_killed_repro_resumes_to_the_uninterrupted_outputs(tmp_path):
    straight = make_repo(tmp_path / "straight")
    straight.compose_params(KILL_OVERRIDES)
    run = Repro(straight, tmp_path / "straight.log")
    while run.poll():
        time.sleep(0.05)
    run.finish()
    timing = _durations(run)
    total = time.monotonic() - run.start

    rng = random.Random(SEED)
    targets = []
    for kind, pattern in KINDS.items():
        stages = [name for name in timing if re.fullmatch(pattern, name)]
        assert stages, f"no {kind} stage ran: {list(timing)}"
        name = rng.choice(stages)
        targets.append((timing[name][0], kind, name, rng.uniform(0.05, 0.95)))
    targets.sort()

    killed = make_repo(tmp_path / "killed")
    killed.compose_params(KILL_OVERRIDES)
    report, started = [], time.monotonic()
    run = Repro(killed, tmp_path / "killed-0.log")
    for n, (_, kind, name, share) in enumerate(targets, 1):
        began = run.wait_for_stage(name, timeout=REPRO_TIMEOUT_S)
        if began is None:
            report.append(f"kill {n}: {kind} stage {name} missed: dvc repro had finished")
            break
        delay = share * timing[name][1]
        while time.monotonic() - run.start < began + delay and run.poll():
            if any(stage != name for t, stage in run.stages if t > began):
                break  # the stage ended before its moment: kill at once, between stages
            time.sleep(0.01)
        at = time.monotonic() - run.start - began
        commands = run.running_commands()
        run.kill()
        report.append(f"kill {n}: {kind} stage {name} at {at:.1f} s of its {timing[name][1]:.1f} s "
                      f"(running: {', '.join(commands) or 'no skinaug command, dvc itself'}); "
                      f"left: {_what_is_there(killed)}")
        run = Repro(killed, tmp_path / f"killed-{n}.log")
    run.finish()
    for n in range(1, len(report) + 1):  # what each resumed run said about the work it found
        log = tmp_path / f"killed-{n}.log"
        said = RESUMED.findall(log.read_text()) if log.exists() else []
        report[n - 1] += f"; resumed: {'; '.join(dict.fromkeys(said)) or 'nothing to say'}"
    report.append(f"straight run {total:.0f} s; killed and resumed {time.monotonic() - started:.0f} s")
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

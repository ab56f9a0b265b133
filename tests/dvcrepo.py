"""A throwaway git + DVC copy of this repository for tests that drive the real pipeline (test_pipeline).

`make_repo(base)` copies the repository's tracked files (as they are in the working tree, uncommitted
edits included) into base/repo, commits them, and returns a Repo whose commands run with an
environment of their own (base/home) and the venv's `dvc` and `skinaug` first on PATH. PYTHONPATH
passes through, so a worktree's source can stand in for the venv's editable install.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = [str(BIN / "dvc")] if (BIN / "dvc").exists() else [sys.executable, "-m", "dvc"]
# Repo.dvc runs DVC's stages as `make demo` does, forked from a warm process (skinaug/prefork.py); one
# per repository, started at its first DVC command and kept until the test module ends (stop_servers),
# so that each further `dvc repro` or `dvc exp run` does not import torch and diffusers again (8 s),
# and the workers of `dvc queue start` find it too. A forked stage dies a moment after its client
# does: test_pipeline's interrupted repro, which looks at what a kill left at once, starts DVC
# without it; test_kill runs each `dvc repro` under a warm process of its own (WARM), as `make demo`
# does, kills both, and waits for all their processes, the fork too, to go.
# SKINAUG_TEST_COLD=1 runs every test's DVC cold.
COLD = bool(os.environ.get("SKINAUG_TEST_COLD"))
WARM = [] if COLD else [sys.executable, "-m", "skinaug.prefork"]
HOLD = "import os, sys; print(os.environ['SKINAUG_PREFORK'], flush=True); sys.stdin.read()"  # until stdin closes
_SERVERS: list[subprocess.Popen] = []
RUN_TIMEOUT_S = 900  # one reduced `dvc exp run` or `dvc repro` (about 2 min on 2 idle cores; a guard, not a target)
CMD_TIMEOUT_S = 300  # any other git/dvc command

# The reduced demo: every stage runs, each in seconds. Lists use Hydra's override syntax.
LABELS = ["prurigo nodularis", "nematode infection"]  # the two smallest labels of Table 1: 188 images
STRATEGIES = ["txt2img_vanilla", "img2img_lora", "img2img_ti_lora"]
OVERRIDES = [
    "model.tiny_vae_steps=0", "model.tiny_unet_steps=0",  # a random tiny base model
    "splits.seeds=[0]",
    "subset.labels=[" + ",".join(f"'{label}'" for label in LABELS) + "]",
    "world.image_size=32",
    "textual_inversion.steps=2", "lora.steps=2",
    "generate.steps=2", "generate.batch_size=8",  # small batches: an interrupted run stops between them
    "classify.epochs=1", "backbone.corpus=64", "backbone.epochs=1",
    "ablation.seeds=[0]", "ablation.sources_per_label=2", "ablation.strategies=[" + ",".join(STRATEGIES) + "]",
    "ablation.epochs=2",  # the ablation's own budget (--epochs), not classify.epochs
]
OUTPUT_DIRS = ("data", "models", "metrics", "reports", "dvclive")


def env(home: Path) -> dict:
    """The one environment every test runs git, dvc and skinaug in: no user or system config, no
    cloud credentials, no network for the hub; this venv's commands first on PATH."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    return keep | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `skinaug` of this venv for the stages
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
        "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"), "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "skinaug test", "GIT_AUTHOR_EMAIL": "test@skinaug.invalid",
        "GIT_COMMITTER_NAME": "skinaug test", "GIT_COMMITTER_EMAIL": "test@skinaug.invalid",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(home / "torch"), "PYTHONUNBUFFERED": "1",  # log lines as they happen
        "AWS_CONFIG_FILE": str(home / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-creds"),
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud metadata endpoint for credentials
    }


class Repo:
    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, env
        self._warm: tuple[dict, str] | None = None  # (the environment its warm process started in, its socket)

    def run(self, *cmd: str, timeout: float = CMD_TIMEOUT_S, ok: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), cwd=self.path, env=env or self.env, capture_output=True, text=True,
                                timeout=timeout)
        if ok and result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                        f"{result.stderr[-4000:]}")
        return result

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(*DVC, *args, env=self.warm_env(), **kw)

    def warm_env(self) -> dict:
        """self.env naming this repository's warm process (SKINAUG_PREFORK), started in self.env if it
        has none yet or self.env changed since; self.env itself when SKINAUG_TEST_COLD is set."""
        if COLD:
            return self.env
        if self._warm is None or self._warm[0] != self.env:
            server = subprocess.Popen([*WARM, sys.executable, "-c", HOLD], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=self.env)
            _SERVERS.append(server)
            self._warm = (dict(self.env), server.stdout.readline().strip())
            assert self._warm[1], "skinaug.prefork started no warm process"
        return self.env | {"SKINAUG_PREFORK": self._warm[1]}

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def compose_params(self, overrides: list[str]) -> None:
        """params.yaml composed from conf/ with Hydra overrides, as `dvc exp run -S` composes it."""
        script = ("import sys; from dvc.utils.hydra import compose_and_dump; "
                  "compose_and_dump('params.yaml', sys.argv[1], None, 'config', '.', sys.argv[2:])")
        self.run(sys.executable, "-c", script, str(self.path / "conf"), *overrides)

    def status(self) -> set[str]:
        """Names of the stages `dvc status` says changed."""
        out = json.loads(self.dvc("status", "--json").stdout or "{}")
        # The paper's metadata (data.dvc, a frozen import) is never fetched by the demo: always "not in cache".
        if out.get("data.dvc") == [{"changed outs": {"data/fitzpatrick17k.csv": "not in cache"}}]:
            del out["data.dvc"]
        return {name.split(":")[-1] for name in out}

    def run_queue(self, jobs: int, timeout: float) -> str:
        """`dvc queue start -j jobs`, then `dvc queue status` every 5 s until nothing is queued or
        running: the last status. The start's output goes to a file, not to pipes: its workers,
        forked by dvc-task through multiprocessing, hold the caller's stdout and stderr until they
        exit, so reading pipes would wait for every experiment under CMD_TIMEOUT_S (CI, 2026-11-30:
        it ran out). A worker that quits with experiments still queued (dvc#10562) is started again,
        as DVC's issue says users do. Fails, with the queue's and the workers' logs, at `timeout`."""
        self._start_queue(jobs, attempt=0)
        deadline, starts, started, status = time.monotonic() + timeout, 1, time.monotonic(), ""
        while time.monotonic() < deadline:
            time.sleep(5)
            status = self.dvc("queue", "status").stdout
            if "Running" not in status and "Queued" not in status:
                self.dvc("queue", "stop", "--kill", ok=False)
                return status
            no_worker = "Running" not in status and "Worker status: 0 active, 0 idle" in status
            if no_worker and time.monotonic() - started > 30 and starts < 3:  # dvc#10562
                self._start_queue(jobs, attempt=starts)
                starts, started = starts + 1, time.monotonic()
        self.dvc("queue", "stop", "--kill", ok=False)
        workers = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                            for p in sorted((self.path / ".dvc" / "tmp" / "exps" / "celery").glob("*.out")))
        pytest.fail(f"the queue did not finish within {timeout} s ({starts} starts):\n{status}\n{workers}")

    def _start_queue(self, jobs: int, attempt: int) -> None:
        """`dvc queue start -j jobs`, its output to a file beside the repository (see run_queue)."""
        log = self.path.parent / f"queue-start-{attempt}.log"
        with open(log, "w") as out:
            done = subprocess.run([*DVC, "queue", "start", "-j", str(jobs)], cwd=self.path, env=self.warm_env(),
                                  stdout=out, stderr=subprocess.STDOUT, timeout=CMD_TIMEOUT_S)
        assert done.returncode == 0, log.read_text()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """(mtime_ns, size) of every output file and of dvc.lock."""
        files = [self.path / "dvc.lock"]
        for top in OUTPUT_DIRS:
            files += [p for p in (self.path / top).rglob("*") if p.is_file()]
        return {str(p.relative_to(self.path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


def stop_servers() -> None:
    """End every warm process Repo.dvc started (conftest calls it as each test module ends)."""
    while _SERVERS:
        server = _SERVERS.pop()
        server.stdin.close()  # its command reads stdin to the end, then exits; the warm process follows
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


def make_repo(base: Path) -> Repo:
    """base/repo: a git + DVC repository holding this one's tracked files; base/home: its HOME."""
    home, path = base / "home", base / "repo"
    home.mkdir(parents=True)
    path.mkdir()
    repo = Repo(path, env(home))
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True,
                             check=True).stdout.split("\0")
    for name in filter(None, tracked):  # the working tree's tracked files, uncommitted edits included
        src = ROOT / name
        if src.is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    repo.run("git", "init", "-q")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "skinaug")
    return repo


def start_two_waiting(cmd: list[str], env: dict, out: Path, logs: list[Path]) -> list[subprocess.Popen]:
    """Start `cmd` twice (output to logs[0], logs[1]) while this process holds `out`'s lock, and return
    once both say they are waiting for it: the two runs then take turns on one output."""
    from skinaug import atomic

    with atomic.locked(out):  # both reach the lock before either may write
        runs = []
        for log in logs:
            with open(log, "w") as f:
                runs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(r.poll() is None for r in runs), [l.read_text() for l in logs]
            time.sleep(0.1)
    return runs

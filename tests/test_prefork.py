"""skinaug/prefork.py: `skinaug` commands forked from one warm process behave as cold ones.

Each test starts `python -m skinaug.prefork CMD` for real (a server that imports the heavy modules
at its first request, about 10 s) and runs `skinaug` commands under it. The reduced demo under it
is checked by every test that drives DVC (tests/dvcrepo.py runs DVC this way).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from skinaug import prefork

WARM = [sys.executable, "-m", "skinaug.prefork"]
SKINAUG = str(Path(sys.executable).parent / "skinaug")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != prefork.ENV}
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"} | extra


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_what_dvc_and_a_queued_experiment_s_worker_set_per_stage_may_differ():
    ours = {"HOME": "/h", "OMP_NUM_THREADS": "2", "PWD": "/a", prefork.ENV: "/s"}
    assert prefork.difference(ours, ours | {"PWD": "/b", "DVC_ROOT": "/r", "DVC_EXP_NAME": "x"}) == ""
    celery = {"CELERY_LOG_FILE": "/q/w.log", "CELERY_LOG_LEVEL": "10", "_MP_FORK_LOGLEVEL_": "10"}
    assert prefork.difference(ours, ours | celery) == ""  # a queued experiment's stage (dvc exp run --run-all)
    assert prefork.difference(ours, ours | {"OMP_NUM_THREADS": "1"}) == "OMP_NUM_THREADS"
    assert prefork.difference(ours, {k: v for k, v in ours.items() if k != "HOME"} | {"X": "1"}) == "HOME, X"


def test_a_command_runs_in_the_warm_process_and_makes_what_a_cold_one_makes(tmp_path, params_file):
    """The client process never imports what the command needs (numpy here): the work ran in the
    forked child. Its files, output and exit status are the cold run's."""
    params = params_file()
    client = ("import os, sys; from skinaug import prefork; "
              f"sys.argv = ['skinaug', '--params', {str(params)!r}, 'world', {str(tmp_path / 'warm')!r}]; "
              "status = prefork._forward(os.environ[prefork.ENV]); "
              "print('status', status, 'numpy here', 'numpy' in sys.modules)")
    warm = subprocess.run([*WARM, sys.executable, "-c", client], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert "world: 1631 images in" in warm.stdout
    assert "status 0 numpy here False" in warm.stdout
    cold = subprocess.run([SKINAUG, "--params", str(params), "world", str(tmp_path / "cold")], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert cold.returncode == 0, cold.stderr
    assert _files(tmp_path / "warm") == _files(tmp_path / "cold")


def test_errors_and_exit_status_come_back_and_a_changed_environment_runs_cold(tmp_path):
    script = (f"{SKINAUG} --params {tmp_path / 'none.yaml'} world {tmp_path / 'w'}; echo status=$?; "
              f"OMP_NUM_THREADS=7 {SKINAUG} --help > /dev/null; echo status=$?")
    run = subprocess.run([*WARM, "sh", "-c", script], env=_env(OMP_NUM_THREADS="2"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0
    assert run.stdout.split() == ["status=1", "status=0"]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2, run.stderr
    assert "none.yaml" in lines[0]  # the one-line error of a missing params file
    assert lines[1] == ("skinaug: running cold, not in the warm process "
                        "(the environment differs: OMP_NUM_THREADS)")


def test_without_a_server_the_command_runs_cold_and_says_nothing(tmp_path):
    run = subprocess.run([SKINAUG, "--help"], env=_env(**{prefork.ENV: str(tmp_path / "gone")}),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Usage: skinaug" in run.stdout
    assert run.stderr == ""


def test_the_exit_status_of_the_wrapped_command_is_the_wrappers(tmp_path):
    assert subprocess.run([*WARM, "sh", "-c", "exit 3"], env=_env(), timeout=60).returncode == 3
    missing = subprocess.run([*WARM, str(tmp_path / "nothing")], env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 127 and "cannot run" in missing.stderr


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_stopping_the_client_stops_the_forked_command(tmp_path, params_file, how):
    """A SIGKILL of the client (DVC's process group killed) or a SIGTERM it forwards: the forked
    command, here a long pretraining, is gone within seconds, and so is the server once its
    command has ended."""
    params = params_file(model={"base": "tiny", "tiny_vae_steps": 100000, "tiny_unet_steps": 0})
    server = subprocess.Popen([*WARM, SKINAUG, "--params", str(params), "base", str(tmp_path / "base")],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # the server's children: the client it started, then the command it forked
            children = psutil.Process(server.pid).children()
            if len(children) == 2:
                break
            assert time.monotonic() < deadline and server.poll() is None, "the command was never forked"
            time.sleep(0.1)
        # the forked child carries the server's command line; the client its own
        (forked,) = [c for c in children if "skinaug.prefork" in c.cmdline()]
        (client,) = [c for c in children if c.pid != forked.pid]
        client.send_signal(getattr(signal, how))
        assert server.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs([forked], timeout=30)
        assert not alive, f"the forked command {forked.pid} outlived its client"
    finally:
        if server.poll() is None:
            server.kill()


def test_no_socket_possible_runs_the_command_cold_after_one_line(tmp_path):
    """A TMPDIR too long for a Unix socket's path: the command still runs, every stage cold."""
    long_tmp = tmp_path / ("x" * 120)
    long_tmp.mkdir()
    run = subprocess.run([*WARM, "sh", "-c", "echo ran; exit 4"], env=_env(TMPDIR=str(long_tmp)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 4 and run.stdout == "ran\n"
    assert run.stderr.startswith("skinaug.prefork: no warm process (") and run.stderr.count("\n") == 1


def _rwlock(root: Path, text: str) -> Path:
    path = root / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _repo_with_two_stages(root: Path, env: dict) -> str:
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, timeout=120)
    (root / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo hi > a.txt\n    outs:\n      - a.txt\n"
                                   "  b:\n    cmd: cat a.txt a.txt > b.txt\n    deps:\n      - a.txt\n"
                                   "    outs:\n      - b.txt\n")
    return dvc


@pytest.mark.parametrize("text", ["", '{"read": {"data/images": [{"pid": 12', "{"])
def test_a_rwlock_cut_short_by_a_killed_dvc_is_removed(tmp_path, text, capsys):
    path = _rwlock(tmp_path, text)
    (tmp_path / "sub").mkdir()
    assert prefork.mend_rwlock(tmp_path / "sub")  # found from a folder inside the repository
    assert not path.exists()
    assert "removed .dvc/tmp/rwlock" in capsys.readouterr().err


def test_a_whole_rwlock_a_held_one_and_no_repository_are_left_alone(tmp_path):
    repo, lone = tmp_path / "repo", tmp_path / "lone"
    whole = '{"read": {}, "write": {"data/images": {"pid": 1, "cmd": "dvc repro"}}}'
    path = _rwlock(repo, whole)
    assert not prefork.mend_rwlock(repo) and path.read_text() == whole
    path.write_text("")
    import zc.lockfile

    guard = zc.lockfile.LockFile(str(path.with_name("rwlock.lock")))  # a live DVC editing it
    try:
        assert not prefork.mend_rwlock(repo) and path.read_text() == ""
    finally:
        guard.close()
    assert prefork.mend_rwlock(repo) and not path.exists()  # the guard released: mended
    assert not prefork.mend_rwlock(repo)  # no file: nothing to do
    lone.mkdir()
    (lone / "rwlock").write_text("")  # not under a .dvc folder: not DVC's
    assert not prefork.mend_rwlock(lone) and (lone / "rwlock").exists()


def test_dvc_repro_under_the_warm_process_runs_after_a_kill_left_the_rwlock_empty(tmp_path):
    """DVC alone stops at the empty file (treeverse/dvc#7615); started by skinaug.prefork it runs."""
    env = _env()
    dvc = _repo_with_two_stages(tmp_path, env)
    _rwlock(tmp_path, "")
    alone = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "JSON structure is corrupted" in alone.stdout + alone.stderr
    warm = subprocess.run([*WARM, dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "removed .dvc/tmp/rwlock" in warm.stderr and (tmp_path / "b.txt").read_text() == "hi\nhi\n"


def test_dvc_repro_under_the_warm_process_runs_after_a_stop_cut_dvc_lock_short(tmp_path):
    """A dvc.lock cut short mid-write stops DVC alone ("is invalid"); under skinaug.prefork the lock
    is set aside, DVC takes the finished stages from its run cache, and the lock comes back whole."""
    env = _env()
    dvc = _repo_with_two_stages(tmp_path, env)
    subprocess.run([dvc, "repro", "-q"], cwd=tmp_path, env=env, check=True, timeout=120)
    whole = (tmp_path / "dvc.lock").read_text()
    cut = whole[: whole.index("size:", whole.index("b:")) + 3]  # mid-key in stage b's record
    (tmp_path / "dvc.lock").write_text(cut)
    alone = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "is invalid" in alone.stdout + alone.stderr
    warm = subprocess.run([*WARM, dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "dvc.lock was cut short" in warm.stderr
    assert (tmp_path / "dvc.lock").read_text() == whole
    assert (tmp_path / ".dvc" / "tmp" / "dvc.lock.cut-short").read_text() == cut


def test_a_dvc_lock_that_parses_or_whose_repository_lock_is_held_is_left_alone(tmp_path):
    lock = tmp_path / "dvc.lock"
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    lock.write_text("schema: '2.0'\nstages: {}\n")
    assert not prefork.mend_lockfile(tmp_path) and lock.exists()
    lock.write_text("schema: '2.0'\nstages:\n  a:\n    cmd: [")
    import zc.lockfile

    guard = zc.lockfile.LockFile(str(tmp_path / ".dvc" / "tmp" / "lock"))  # a live DVC in the repository
    try:
        assert not prefork.mend_lockfile(tmp_path) and lock.exists()
    finally:
        guard.close()
    assert prefork.mend_lockfile(tmp_path) and not lock.exists()

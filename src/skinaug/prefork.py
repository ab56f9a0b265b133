"""One warm process forks every `skinaug` command of a run: the imports are paid once, not per stage.

Each DVC stage is a fresh process, and a `skinaug` command spends its first 6 to 10 s importing
torch, torchvision, scikit-learn, transformers and diffusers: on the demo's CPU sizes that is more
than most stages compute (the demo runs 72 stages, the tests' reduced demo 30). So

    python -m skinaug.prefork dvc repro        # what `make demo` runs

runs its command with SKINAUG_PREFORK naming a Unix socket this process listens on. A `skinaug`
command that finds the variable sends its arguments, working folder and environment there, with
its stdin, stdout and stderr (SCM_RIGHTS). At the first request this process imports the heavy
modules (never running a torch op, so no thread pool or device exists yet); for each request it
forks a child that takes over the three streams, the folder and the environment, runs the command
as a fresh process would, and sends back its exit status, which the `skinaug` process exits with.

- A command whose environment differs from this process's (other than what DVC and a queued
  experiment's Celery worker set per stage) runs cold, in its own process, after one line saying
  why: some libraries read variables once, at import (HF_HUB_OFFLINE, OMP_NUM_THREADS).
- The `skinaug` process forwards SIGINT, SIGTERM and SIGHUP to the child, and the child kills
  itself and its own children when that process goes away (SIGKILL of DVC's process group), so
  stopping a run stops its stage as it would without this.
- No server (the variable unset, or its process gone): the command runs cold, silently.
Outputs are those of a cold run, bit for bit: the same code runs on the same inputs and threads.

Before it starts DVC, it mends what a DVC stopped mid-write can leave (`mend`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ENV = "SKINAUG_PREFORK"
# Variables that may differ between this process and a command it forks: DVC sets these per stage,
# and a queued experiment's stages (`dvc exp run --run-all`) run under a Celery worker, which sets
# its logging's (no library reads them at import).
PER_COMMAND = ("DVC_", "CELERY_", "_MP_FORK_")
IGNORED = {ENV, "PWD", "OLDPWD", "SHLVL", "_"}
# What the stages import; each is imported once, before the first fork (missing ones are skipped).
HEAVY = (
    "torch", "torchvision", "sklearn.metrics", "scipy.stats", "pandas", "matplotlib.pyplot", "PIL.Image",
    "transformers", "diffusers", "peft", "accelerate", "dvclive",
    "skinaug.cli", "skinaug.classify.classifiers", "skinaug.classify.quality", "skinaug.classify.select",
    "skinaug.diffusion.base", "skinaug.diffusion.finetune", "skinaug.diffusion.generate",
    "skinaug.demo.tinymodel", "skinaug.report.results", "skinaug.tone",
    # What the forks still imported themselves, half a second a stage (sys.modules after each stage of
    # a reduced dvc.lock run in one process): DVCLive opening the DVC repo as each training stage
    # starts (dvclive.dvc.get_dvc_repo), the quality stage's metrics and plots, modules loaded lazily.
    "dvc.repo", "dvc.repo.experiments", "dvc.repo.plots", "dvc.repo.stage", "dvc.repo.artifacts",
    "dvc.repo.datasets", "dvc.scm", "dvc.lock", "dvc.dirs", "dvc.cachemgr", "dvc.data_cloud",
    "dvc_data.index", "dvc_data.hashfile.db.local", "scmrepo.git", "dulwich.porcelain", "configobj",
    "torchmetrics.image.fid", "torchmetrics.image.kid", "skimage.color", "matplotlib.backends.backend_agg",
    "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin",
    "PIL.PpmImagePlugin", "pandas.io.formats.csvs", "diffusers.guiders", "diffusers.training_utils",
    "skinaug.launch", "skinaug.classify.backbone", "skinaug.demo.backbone",
)
HEAVY_NAMES = {"transformers": ("CLIPTextModel", "CLIPTokenizer"), "skimage.color": ("rgb2lab",),
               "diffusers": ("AutoencoderKL", "UNet2DConditionModel", "StableDiffusionPipeline",
                             "StableDiffusionImg2ImgPipeline", "DDPMScheduler", "PNDMScheduler")}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def command() -> None:
    """The `skinaug` console script: run in the warm process when there is one, else here."""
    path = os.environ.get(ENV)
    status = _forward(path) if path else None
    if status is None:
        from skinaug import cli

        cli.main()
    sys.exit(status)


def comparable(env: dict[str, str]) -> dict[str, str]:
    """The variables that must match for a forked command to see what a fresh process would."""
    return {k: v for k, v in env.items() if k not in IGNORED and not k.startswith(PER_COMMAND)}


def difference(ours: dict[str, str], theirs: dict[str, str]) -> str:
    """'' when two environments may share one warm process, else the names of what differs."""
    a, b = comparable(ours), comparable(theirs)
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


# --- the client: the `skinaug` process DVC started ---

def _forward(path: str) -> int | None:
    """Run this command in the warm process listening at `path`: its exit status, or None to run cold."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return None  # no server (any more): a cold run, as without SKINAUG_PREFORK
    request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    answers = sock.makefile("r")
    first = answers.readline().split(" ", 1)
    if first[0] != "pid":
        why = first[1].strip() if len(first) > 1 else "the warm process closed the connection"
        print(f"skinaug: running cold, not in the warm process ({why})", file=sys.stderr)
        return None
    child = int(first[1])
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _frame: _signal_group(child, number))
    last = answers.readline().split()
    if len(last) == 2 and last[0] == "exit":
        return int(last[1])
    print("skinaug: the forked command ended without an exit status (killed?)", file=sys.stderr)
    return 1


def _signal_group(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, number)


# --- the server: `python -m skinaug.prefork CMD ...` ---

def serve(cmd: list[str]) -> int:
    """Run cmd with a warm process listening for its `skinaug` commands; cmd's exit status."""
    if _runs_dvc(cmd):
        mend(Path.cwd())
    # not TemporaryDirectory: its finalizer would run in every forked child's exit hooks and delete the folder
    folder = tempfile.mkdtemp(prefix="skinaug-prefork-")
    path = os.path.join(folder, "socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
    except OSError as e:  # e.g. a TMPDIR too long for a socket's path (about 100 bytes)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"skinaug.prefork: no warm process ({e}); every stage runs cold", file=sys.stderr)
        return subprocess.call(cmd)
    server.listen(64)
    os.environ[ENV] = path
    started = dict(os.environ)  # what the commands' environments are compared with
    warm: dict[str, str] | None = None  # after the imports: the variables they set
    children: set[int] = set()
    try:
        try:
            proc = subprocess.Popen(cmd)
        except OSError as e:
            print(f"skinaug.prefork: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            return 127
        # A terminal's Ctrl-C reaches cmd too (same process group): let cmd decide; pass a TERM on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda number, _frame: proc.send_signal(number))
        while proc.poll() is None:
            if select.select([server], [], [], 0.2)[0]:
                conn, _ = server.accept()
                if warm is None:
                    _import_heavy()
                    warm = {k: v for k, v in os.environ.items() if started.get(k) != v}
                sys.stdout.flush()  # nothing buffered before the fork may be written twice
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    server.close()
                    _child(conn, started, warm)  # never returns
                conn.close()
                children.add(pid)
            children = {pid for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0)}
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
        for pid in children:  # commands whose client is gone kill themselves; wait for them
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return proc.wait()


def _runs_dvc(cmd: list[str]) -> bool:
    return Path(cmd[0]).name == "dvc" or cmd[1:3] == ["-m", "dvc"]


def mend(folder: Path) -> None:
    """Before DVC starts: mend what a DVC stopped mid-write left in the repository (`mend_rwlock`,
    `mend_lockfile`). DVC rewrites both files in place (truncate, then write), so a kill or a
    Ctrl-C in between leaves them cut short, and every later `dvc repro` stops at once."""
    mend_rwlock(folder)
    mend_lockfile(folder)


def mend_rwlock(folder: Path) -> bool:
    """Remove the repository's .dvc/tmp/rwlock if it is cut short; True if it did.

    DVC rewrites it as each stage starts and ends; cut short, it stops every run with "Unable to
    read RWLock-file ... JSON structure is corrupted" until someone deletes it (treeverse/dvc#7615).
    It holds only which running DVC reads or writes which path. Checked under DVC's own guard for
    it (.dvc/tmp/rwlock.lock, a lock the system releases when its holder dies): while a live DVC
    holds the guard, the file is left alone.
    """
    root = _dvc_root(folder)
    if root is None:
        return False
    tmp = root / ".dvc" / "tmp"
    if not _set_aside(tmp / "rwlock", tmp / "rwlock.lock", _json_parses, None):
        return False
    print("skinaug.prefork: removed .dvc/tmp/rwlock, cut short by a DVC killed while writing it "
          "(treeverse/dvc#7615); DVC starts with no path locks held", file=sys.stderr)
    return True


def mend_lockfile(folder: Path) -> bool:
    """Move the repository's dvc.lock to .dvc/tmp/dvc.lock.cut-short if it is not YAML; True if it did.

    DVC rewrites the whole lock after each stage (1.3 s at the demo's 8,580 lines); cut short, it
    stops every run with "'./dvc.lock' is invalid". Without it, DVC takes each finished stage from
    its run cache (same lock entries, outputs checked out) and re-runs the rest. Checked under DVC's
    repository lock (.dvc/tmp/lock), which DVC holds whenever it writes dvc.lock.
    """
    root = _dvc_root(folder)
    if root is None:
        return False
    tmp = root / ".dvc" / "tmp"
    if not _set_aside(root / "dvc.lock", tmp / "lock", _yaml_parses, tmp / "dvc.lock.cut-short"):
        return False
    print("skinaug.prefork: dvc.lock was cut short by a DVC stopped while writing it; moved it to "
          ".dvc/tmp/dvc.lock.cut-short. DVC restores finished stages from its run cache and re-runs the "
          "rest (git has the last committed dvc.lock)", file=sys.stderr)
    return True


def _dvc_root(folder: Path) -> Path | None:
    return next((p for p in (folder, *folder.parents) if (p / ".dvc").is_dir()), None)


def _set_aside(path: Path, guard: Path, parses, keep: Path | None) -> bool:
    """Under the lock file `guard` (zc.lockfile, as DVC takes it): remove `path`, or move it to `keep`,
    if it does not parse; False if it parses, is missing, or a live process holds the guard."""
    if not path.is_file() or parses(path):
        return False
    import zc.lockfile  # DVC's own locks (installed with DVC, a dependency of skinaug)

    guard.parent.mkdir(parents=True, exist_ok=True)
    try:
        held = zc.lockfile.LockFile(str(guard))
    except zc.lockfile.LockError:  # a live DVC holds it
        return False
    try:
        if not path.is_file() or parses(path):
            return False
        if keep is None:
            path.unlink()
        else:
            os.replace(path, keep)
    finally:
        held.close()
    return True


def _json_parses(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, FileNotFoundError):
        return False
    return True


def _yaml_parses(path: Path) -> bool:
    import yaml

    try:
        yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, ValueError, FileNotFoundError):
        return False
    return True


def _import_heavy() -> None:
    import importlib

    for name in HEAVY:
        try:
            module = importlib.import_module(name)
            for attr in HEAVY_NAMES.get(name, ()):
                getattr(module, attr)  # diffusers and transformers import lazily, per name
        except Exception:  # noqa: BLE001 - an optional package missing: its commands import it themselves
            continue
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use the device
        raise RuntimeError("skinaug.prefork: an import initialised CUDA; run without the warm process")


def _child(conn: socket.socket, started: dict[str, str], imported: dict[str, str]) -> None:
    """In the forked child: become the command's process, run it, report its status, exit.

    started: this process's environment before the imports; imported: the variables they set
    (torch sets KMP_* for instance), which a fresh process's imports would set too."""
    status = 1
    try:
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own group: the client's forwarded signals reach its children too
        request, fds = _receive(conn)
        why = difference(started, request["env"])
        if why:
            conn.sendall(f"cold the environment differs: {why}\n".encode())
            os._exit(0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"] | imported)
        sys.argv = request["argv"]
        conn.sendall(f"pid {os.getpid()}\n".encode())
        threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
        status = _run_cli()
    except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
        traceback.print_exc()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()  # what a fresh process runs at exit (flushes, temp files)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(f"exit {status}\n".encode())
    os._exit(status)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise ConnectionError("the client closed the connection mid-request")
        data += more
    return json.loads(data), fds


def _die_with_client(conn: socket.socket) -> None:
    """The client never sends after its request: end of stream means it died; die with it."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    os.killpg(0, signal.SIGKILL)


def _run_cli() -> int:
    from skinaug import cli

    try:
        cli.main(prog_name="skinaug")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m skinaug.prefork COMMAND [ARGS...]   (e.g. dvc repro)")
    sys.exit(serve(sys.argv[1:]))

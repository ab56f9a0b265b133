"""Write files so that readers never see half of one (temp file in the same folder, then rename); one
writer per output at a time (a lock file beside it); hash files.

Temp files are named `.{name}.{pid}.{random}.tmp{suffix}`: unique, so two processes writing the
same file never share one, and traceable to their writer, so the next write of that file removes
those of writers that were killed. Lock files are `.{name}.lock`, present only while held (or
after a kill, until the next writer takes them).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path, sweep: bool = True):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    sweep: first remove the temp files of `path` that killed writers left (a scan of the folder;
    callers writing thousands of files into one folder clear it once themselves and pass False).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove the temp files atomic_path made for `path` whose writer is no longer running; return them."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        for entry in entries:
            rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
            pid = rest.split(".", 1)[0]
            if ".tmp" in rest and pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_temp(name: str) -> bool:
    """Whether a file name is one of atomic_path's temp files (of any writer)."""
    return name.startswith(".") and ".tmp" in name


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict | None:
    """A JSON record written by write_json, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


@contextlib.contextmanager
def locked(path: str | Path, enabled: bool = True):
    """Hold `path`'s lock (an exclusive flock on `.{name}.lock` beside it) for the block.

    A second writer of the same output waits here, saying so once, until the first is done; the
    lock goes with its holder, so a killed writer never blocks the next. The holder removes the
    lock file before releasing it, and a waiter that then finds the file gone or replaced tries
    again, so two writers never hold locks on two different files of one name.
    enabled: False for the processes of a launch other than the main one (they wait at its barriers).
    """
    if not enabled:
        yield
        return
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not said:
                print(f"waiting for another process writing {path} (it holds {lock})", flush=True)
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we waited on it: lock the new one
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Rename the finished folder `new` onto target; an old target is moved aside first and removed after."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)

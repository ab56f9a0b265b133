"""Atomic writes and output locks: unique temp names, killed writers' leftovers, one writer at a time."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from skinaug import atomic


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_write_removes_what_killed_writers_of_that_file_left(tmp_path):
    out = tmp_path / "m.json"
    dead = tmp_path / f".m.json.{_dead_pid()}.k2j3.tmp.json"
    alive = tmp_path / f".m.json.{os.getpid()}.x9z8.tmp.json"  # a writer still at work: not ours to touch
    other = tmp_path / f".n.json.{_dead_pid()}.abcd.tmp.json"  # another file's: its own next write removes it
    for path in (dead, alive, other):
        path.write_text("{")
    atomic.write_json(out, {"a": 1})
    assert not dead.exists() and alive.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, alive.name, other.name])


def test_temp_names_are_unique_and_say_whose_they_are(tmp_path):
    with atomic.atomic_path(tmp_path / "a.csv") as first, atomic.atomic_path(tmp_path / "a.csv") as second:
        assert first != second
        assert first.name.startswith(f".a.csv.{os.getpid()}.") and first.name.endswith(".tmp.csv")
        assert atomic.is_temp(first.name)
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "a.csv").read_text() == "1"  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def _hold(path, held, release, log):
    with atomic.locked(path):
        held.set()
        release.wait(30)
        log.write_text("first done")


def test_a_second_writer_waits_for_the_first(tmp_path, capsys):
    out, log = tmp_path / "out", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold, args=(out, held, release, log))
    first.start()
    try:
        assert held.wait(30)
        assert (tmp_path / ".out.lock").exists()
        ctx.Process(target=lambda: (time.sleep(0.5), release.set())).start()
        with atomic.locked(out):
            assert log.read_text() == "first done"  # not in before the first was out
    finally:
        release.set()
        first.join(30)
    assert "waiting for another process writing" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [log]  # the lock file goes with its last holder


def test_a_lock_is_released_when_its_block_fails(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic.locked(tmp_path / "out"):
        1 / 0
    with atomic.locked(tmp_path / "out"):  # would wait forever on a lock still held
        pass
    assert list(tmp_path.iterdir()) == []

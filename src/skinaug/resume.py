"""Resumable work: a hidden folder beside an output where an unfinished run keeps its checkpoint.

    with resume.Work(out, fingerprint) as work:   # waits while another process works on `out`
        state = work.state                        # the checkpoint to continue from, or None
        ...                                       # work.save(state) after each step or epoch
        work.finish()                             # a folder built in work.path: renamed onto out
        # or, when out is a file written by the caller: work.discard()

The folder is `.{out.name}.partial`, beside out; its fingerprint.json holds what the checkpoint
belongs to (settings, seed, input hashes). A run with the same fingerprint continues from the
checkpoint, any other starts the folder afresh, and out itself never holds a partial result.
One process at a time holds an output's work (atomic.locked): a second run of the same stage on
the same output waits, then starts from whatever the first left (nothing, once it finished).
Textual inversion, LoRA and the classifiers resume through it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from skinaug import atomic

CHECKPOINT = "checkpoint.pt"
FINGERPRINT = "fingerprint.json"


class _OneProcess:
    """accelerate's process state as Work uses it, for a run without a launcher."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


class Work:
    """out's hidden sibling folder, holding the checkpoint of an unfinished run (see the module docstring).

    processes: accelerate's Accelerator or PartialState under a launcher; only its main process
    locks and writes, the others wait where it matters and load the same checkpoint.
    """

    def __init__(self, out: str | Path, fingerprint: dict, processes=None):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.processes = processes or _OneProcess()
        self.state: dict | None = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Work:
        with contextlib.ExitStack() as held:
            held.enter_context(atomic.locked(self.out, enabled=self.processes.is_main_process))
            self.state = self._open()
            self._held = held.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()

    def _open(self) -> dict | None:
        """The checkpoint to resume from (the same for every process), or None after a fresh start."""
        stamp, checkpoint = self.path / FINGERPRINT, self.path / CHECKPOINT
        if self.processes.is_main_process:
            shutil.rmtree(self._old(), ignore_errors=True)  # a rename cut short by a kill
            if atomic.read_json(stamp) == self.fingerprint and checkpoint.is_file():
                print(f"resuming from {checkpoint}", flush=True)
                for leftover in self.path.rglob(".*"):  # writes a kill cut short
                    if leftover.is_file() and atomic.is_temp(leftover.name):
                        leftover.unlink()
            else:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir(parents=True)
                atomic.write_json(stamp, self.fingerprint)
        self.processes.wait_for_everyone()
        return torch.load(checkpoint, weights_only=True) if checkpoint.is_file() else None

    def save(self, state: dict) -> None:
        """Replace the checkpoint (atomically: a kill while saving leaves the previous one)."""
        self.state = state
        if self.processes.is_main_process:
            with atomic.atomic_path(self.path / CHECKPOINT) as tmp:
                torch.save(state, tmp)

    def finish(self) -> None:
        """Rename the folder, less checkpoint and fingerprint, onto out; every process returns once it is there."""
        if self.processes.is_main_process:
            for name in (CHECKPOINT, FINGERPRINT):
                (self.path / name).unlink(missing_ok=True)
            atomic.replace_dir(self.path, self.out)
        self.processes.wait_for_everyone()

    def discard(self) -> None:
        """Delete the folder: out (written by the caller) is complete."""
        if self.processes.is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)
        self.processes.wait_for_everyone()

    def _old(self) -> Path:
        return self.out.with_name(f".{self.out.name}.old")

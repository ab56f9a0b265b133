"""Training curves through DVCLive: one folder per training run, written while it trains.

    dvclive/scenario1/seed0/resnet18_real/plots/metrics/train/loss.tsv   a row per epoch (step = epoch)
    dvclive/scenario1/seed0/ti/plots/metrics/loss/bas-class.tsv         a row per textual_inversion.log_every updates
    dvclive/scenario1/seed0/lora/plots/metrics/loss/joint.tsv           a row per lora.log_every updates
    .../metrics.json                                                     the last row's values (DVCLive's summary)

dvc.yaml declares each folder's plots/ as a plots output (x: step), so `dvc plots show` and
`dvc plots diff` draw them, and its metrics.json as a plain output (`dvc metrics show PATH` reads
it; declared as metrics, every training run would add its columns to `dvc exp show`). The
adapter stages' folders are cached outputs: DVC restores a stage from its run cache only when
every output is cached, and a sweep's experiments must not train the same adapters again.

The folders are outputs DVC compares byte for byte, so they hold nothing but values computed
from the inputs: no timestamps (DVCLive's log_metric writes one only when asked), no dvc.yaml
(dvcyaml=False), no report. A run resumed from a checkpoint starts its folder afresh and
replays the rows the checkpoint holds (every classifier epoch, every update's loss), so a row
logged after the checkpoint by the run that was killed is neither lost nor written twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class Curve:
    """A DVCLive folder (or nothing: directory None, or a process other than the main one)."""

    def __init__(self, directory: str | Path | None, enabled: bool = True):
        self.live = None
        if directory is not None and enabled:
            from dvclive import Live

            # resume=False: the folder starts empty (a killed run's rows go; the caller replays its checkpoint's)
            self.live = Live(dir=str(directory), resume=False, report=None, dvcyaml=False, save_dvc_exp=False)

    def __enter__(self) -> Curve:
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.end()

    def log(self, step: int, values: dict[str, float]) -> None:
        """One row at `step`: a line in each value's TSV, and metrics.json rewritten."""
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, float(value))
        self.live.next_step()

    def losses(self, history: list, every: int, total: int, names: list[str], replay: bool = False) -> None:
        """Log the loss row that ends at update len(history), if one does; replay: every row up to it.

        history holds one entry per update (a loss, or one loss per name). A row is the mean over
        its window of `every` updates, at updates every, 2 * every, ... and at the last (`total`).
        """
        done = len(history)
        ends = [n for n in range(1, done + 1) if n % every == 0 or n == total] if replay else (
            [done] if done and (done % every == 0 or done == total) else [])
        for end in ends:
            window = np.asarray(history[(end - 1) // every * every : end], dtype=float).reshape(-1, len(names))
            self.log(end, dict(zip(names, window.mean(axis=0))))

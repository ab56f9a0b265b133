"""The report's figures: accuracy bars per scenario (ours beside the paper's), confusion matrices
summed over seeds, and real training images beside their synthetic versions (the paper's Fig. 2).
Each is at most WIDTH_IN inches wide at DPI, so a markdown page shows it 1:1."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from skinaug import SkinaugError, atomic
from skinaug.config import ARCHS, SELECTION_LABELS, TRAIN_TYPES
from skinaug.data import fitzpatrick
from skinaug.report.names import ARCH_NAMES, METRICS, SCENARIO_CAPTIONS, TRAIN_NAMES, ordered, paper_accuracy

COLOURS = {"real": "#4c72b0", "syn": "#dd8452", "real_syn": "#55a868"}
# Figures are shown 1:1 in a markdown page (GitHub's column is about 880 px): at most WIDTH_IN inches
# at DPI, so nothing is shrunk, and no text below MIN_FONT_PT.
DPI, WIDTH_IN, MIN_FONT_PT = 110, 8.0, 8


def metrics_figure(summary: pd.DataFrame, scenario: int, selection: str, path: Path) -> None:
    archs = ordered(summary.arch, ARCHS)
    fig = Figure(figsize=(WIDTH_IN, 6.4), layout="constrained")
    axes = fig.subplots(2, 2, sharey=True).ravel()
    x, width = np.arange(len(archs)), 0.8 / len(TRAIN_TYPES)
    for ax, (m, name) in zip(axes, METRICS.items()):
        for i, t in enumerate(TRAIN_TYPES):
            s = summary[summary.train_type == t].set_index("arch").reindex(archs)
            ax.bar(x + (i - 1) * width, s[f"{m}_mean"], width, yerr=s[f"{m}_std"].fillna(0), capsize=3,
                   color=COLOURS[t], label=f"ours {TRAIN_NAMES[t]}")
            if m == "accuracy_pct":
                reported = [paper_accuracy(scenario, a, t) for a in archs]
                ax.plot(x + (i - 1) * width, reported, "k_", markersize=14, mew=2,
                        label="paper (reported)" if i == 0 else None)
        ax.set(title=name, xticks=x, xticklabels=[ARCH_NAMES.get(a, a) for a in archs], ylim=(0, 100))
    for ax in axes[::2]:
        ax.set_ylabel("% on the test set\n(mean ± sample std over seeds)", fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=MIN_FONT_PT + 1)
    fig.suptitle(f"Scenario {scenario}: {SCENARIO_CAPTIONS.get(scenario, '')}\nselection: {SELECTION_LABELS[selection]}",
                 fontsize=10)
    _save(fig, path)


def confusion_figure(runs: pd.DataFrame, scenario: int, selection: str, path: Path) -> None:
    """Confusion matrices summed over seeds, one panel per arch × train type; colour = row share."""
    labels = runs.record.iloc[0]["labels"]
    archs, types = ordered(runs.arch, ARCHS), ordered(runs.train_type, list(TRAIN_TYPES))
    short = [label[:3] for label in labels]
    side = min(3.3, WIDTH_IN / len(types))
    fig = Figure(figsize=(side * len(types), side * len(archs) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(archs), len(types), squeeze=False))
    for (i, arch), (j, t) in ((a, b) for a in enumerate(archs) for b in enumerate(types)):
        ax, g = axes[i, j], runs[(runs.arch == arch) & (runs.train_type == t)]
        if g.empty:
            ax.set_axis_off()
            continue
        cm = np.sum([np.asarray(r["confusion_matrix"]) for r in g.record], axis=0)
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=MIN_FONT_PT,
                    color="white" if share[r, c] > 0.6 else "black")
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=short, yticklabels=short)
        ax.set_title(f"{ARCH_NAMES.get(arch, arch)}, {TRAIN_NAMES.get(t, t)} ({len(g)} seeds)", fontsize=9)
        ax.tick_params(labelsize=MIN_FONT_PT)
    key = [f"{s} = {label}" for s, label in zip(short, labels)]
    fig.suptitle(f"Scenario {scenario}, selection {selection}: rows true label, columns predicted; summed over seeds\n"
                 + "\n".join(", ".join(key[i:i + 4]) for i in range(0, len(key), 4)), fontsize=MIN_FONT_PT + 1)
    _save(fig, path)


def pairs_figure(split_dir: Path, images_dir: Path, syn_dir: Path, labels: list[str], path: Path,
                 per_source: int = 5) -> None:
    """The paper's Fig. 2: per label, one real training image (the lightest skin type available)
    beside its synthetic versions."""
    train = fitzpatrick.read_table(Path(split_dir) / "train.csv")
    manifest = fitzpatrick.read_table(Path(syn_dir) / "manifest.csv")
    chosen = []
    for label in labels:
        rows = train[(train.label == label) & train.md5hash.isin(manifest.source_md5hash)]
        if len(rows):
            src = rows.sort_values("fitzpatrick_scale", kind="stable").iloc[0]
            chosen.append((label, src, manifest[manifest.source_md5hash == src.md5hash].head(per_source)))
    if not chosen:
        raise SkinaugError(f"no training image in {split_dir} has a synthetic version in {syn_dir}/manifest.csv")
    cols = 1 + max(len(s) for *_, s in chosen)
    tile = min(1.7, WIDTH_IN / cols)
    fig = Figure(figsize=(tile * cols, (tile + 0.1) * len(chosen)), layout="constrained")
    axes = fig.subplots(len(chosen), cols, squeeze=False)
    for row, (label, src, syn) in zip(axes, chosen):
        tiles = [(Path(images_dir) / f"{src.md5hash}.jpg", f"real, FST {src.fitzpatrick_scale}")]
        tiles += [(Path(syn_dir) / s.file, f"synthetic, FST {s.fitzpatrick_scale}") for s in syn.itertuples()]
        for ax in row:
            ax.set_axis_off()
        for ax, (file, title) in zip(row, tiles):
            with Image.open(file) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_title(title, fontsize=MIN_FONT_PT)
        row[0].text(-0.08, 0.5, label, transform=row[0].transAxes, rotation=90, ha="right", va="center",
                    fontsize=MIN_FONT_PT)
    fig.suptitle("Real training images (left)\nand their synthetic versions", fontsize=9)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")

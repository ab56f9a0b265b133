"""How the report names and orders things: metric, architecture, training-type, scenario and
strategy names, the paper's order, and the paper's reported accuracy for a cell (paper.py's numbers)."""
from __future__ import annotations

import numpy as np

from skinaug import paper
from skinaug.classify.archs import ARCHITECTURES
from skinaug.config import TRAIN_TYPES
from skinaug.diffusion.strategies import STRATEGIES

METRICS = {"accuracy_pct": "Accuracy", "precision_pct": "Precision", "recall_pct": "Recall", "f1_pct": "F1"}
ARCH_NAMES = {arch: row.title for arch, row in ARCHITECTURES.items()}
TRAIN_NAMES = {"real": "real", "syn": "syn", "real_syn": "real+syn"}
SCENARIO_CAPTIONS = {1: "train dark non-flexible + light non-flexible → test dark flexible",
                     2: "train dark flexible + light non-flexible → test dark non-flexible",
                     3: "train light non-flexible → test dark non-flexible"}
STRATEGY_NAMES = {name: row.title for name, row in STRATEGIES.items()}


def ordered(values, order) -> list:
    """The distinct values in `order`'s order, unknown ones last (alphabetically)."""
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), str(v)))


def paper_accuracy(scenario: int, arch: str, train_type: str) -> float:
    return paper.ACCURACY.get(scenario, {}).get(arch, (np.nan,) * 3)[TRAIN_TYPES.index(train_type)]

"""What a classifier's run writes: its test metrics (score) and where its per-image predictions go.

Apart from classifiers.py so that the report reads both without importing torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def predictions_path(out_json: Path) -> Path:
    """Where a metrics file's per-image predictions go: beside it, {stem}.predictions.csv
    (md5hash, fitzpatrick_scale, label, predicted), the report's bootstrap draws from them. The
    record does not name it, so a record stays the same wherever it is written."""
    return Path(out_json).with_suffix(".predictions.csv")


def score(y_true, y_pred, labels: list[str], fitzpatrick_scale) -> dict:
    """Test metrics in percent; precision, recall and F1 are macro averages over all labels."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    correct = y_true == y_pred
    fst = np.asarray(fitzpatrick_scale)
    return {
        "accuracy_pct": 100 * float(correct.mean()),
        "precision_pct": 100 * float(p.mean()),
        "recall_pct": 100 * float(r.mean()),
        "f1_pct": 100 * float(f.mean()),
        "per_label": {lab: {"precision_pct": 100 * float(p[i]), "recall_pct": 100 * float(r[i]),
                            "f1_pct": 100 * float(f[i]), "support": int(support[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),  # rows true, columns predicted
        "accuracy_pct_by_fitzpatrick_scale": {str(s): 100 * float(correct[fst == s].mean()) for s in sorted(set(fst))},
        "n_test_by_fitzpatrick_scale": {str(s): int((fst == s).sum()) for s in sorted(set(fst))},
        "n_test": len(y_true),
    }

"""How sure a result is: bootstrap intervals over test images, a sign-flip test over seeds, worst group.

A run is one classifier's per-image predictions on its test set (classify.predictions_path): a
table with `true` and `pred` class ids, `md5hash` and `fitzpatrick_scale`. Intervals are 95 %
percentile bootstrap intervals (scipy.stats.bootstrap) of a mean over runs: each run's test images
are drawn with replacement on their own, as each seed has its own test set, and the statistic is
recomputed from the drawn images. A paired difference draws the same images for both classifiers.
The interval says how much the number moves with the test images drawn; the spread over seeds
(training randomness and split) is the sign-flip test's business:

    >>> sign_flip_p([1.0, 2.0, 3.0])  # every seed gains: the smallest p 3 seeds allow, 2 / 2**3
    0.25

Every draw is seeded (report.bootstrap_seed), so the same inputs give the same intervals.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.stats

CONFIDENCE = 0.95  # every interval; the tests are two-sided at 1 - CONFIDENCE
METRICS = ("accuracy_pct", "f1_pct")  # what the intervals are computed for


def accuracy_pct(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Accuracy in percent along the last axis."""
    return 100 * (np.asarray(true) == np.asarray(pred)).mean(axis=-1)


def macro_f1_pct(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Macro F1 in percent over all k classes along the last axis, as sklearn's
    f1_score(average="macro", labels=range(k), zero_division=0) computes it (classify.score):
    per class 2 TP / (2 TP + FP + FN) = 2 TP / (true count + predicted count), 0 when both are 0."""
    true, pred, f1 = np.asarray(true), np.asarray(pred), []
    for c in range(k):
        is_true, is_pred = true == c, pred == c
        tp, denominator = (is_true & is_pred).sum(axis=-1), is_true.sum(axis=-1) + is_pred.sum(axis=-1)
        f1.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
    return 100 * np.mean(f1, axis=0)


SCORES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "accuracy_pct": accuracy_pct, "f1_pct": macro_f1_pct}


def interval(samples: Sequence[np.ndarray], statistic, resamples: int, seed: int) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of statistic(*samples), each sample drawn on its own;
    (nan, nan) when a sample has fewer than two observations (nothing to draw)."""
    if not samples or min(len(s) for s in samples) < 2:
        return np.nan, np.nan
    result = scipy.stats.bootstrap(tuple(samples), statistic, n_resamples=resamples, confidence_level=CONFIDENCE,
                                   method="percentile", vectorized=True, axis=-1, batch=max(1, resamples // 10),
                                   rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(runs: Sequence[pd.DataFrame], metric: str, k: int, resamples: int, seed: int) -> tuple[float, float]:
    """Interval of the mean over runs of one metric (accuracy_pct or f1_pct); k classes."""
    score = SCORES[metric]

    def statistic(*codes: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([score(*np.divmod(c, k), k) for c in codes], axis=0)

    return interval([r.true.to_numpy() * k + r.pred.to_numpy() for r in runs], statistic, resamples, seed)


def paired(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Two classifiers' predictions on the same test images, one row per image: true, pred_a, pred_b."""
    if len(a) != len(b) or set(a.md5hash) != set(b.md5hash):
        raise ValueError("a paired difference needs both classifiers' predictions on the same test images")
    both = a[["md5hash", "fitzpatrick_scale", "true", "pred"]].merge(
        b[["md5hash", "true", "pred"]], on="md5hash", suffixes=("_a", "_b"), validate="one_to_one")
    if (both.true_a != both.true_b).any():
        raise ValueError("the two prediction files disagree on a test image's true label")
    return both.drop(columns="true_b").rename(columns={"true_a": "true"})


def difference_interval(pairs: Sequence[pd.DataFrame], metric: str, k: int, resamples: int,
                        seed: int) -> tuple[float, float]:
    """Interval of the mean over pairs (paired()) of metric(pred_b) − metric(pred_a); each draw of
    a pair's images scores both classifiers on the same images."""
    score = SCORES[metric]

    def statistic(*codes: np.ndarray, axis: int = -1) -> np.ndarray:
        diffs = []
        for c in codes:
            true, rest = np.divmod(c, k * k)
            a, b = np.divmod(rest, k)
            diffs.append(score(true, b, k) - score(true, a, k))
        return np.mean(diffs, axis=0)

    codes = [(p.true.to_numpy() * k + p.pred_a.to_numpy()) * k + p.pred_b.to_numpy() for p in pairs]
    return interval(codes, statistic, resamples, seed)


def contrast_interval(plus: Sequence[pd.DataFrame], minus: Sequence[pd.DataFrame], metric: str, k: int,
                      resamples: int, seed: int) -> tuple[float, float]:
    """Interval of mean(metric over `plus` runs) − mean(metric over `minus` runs), every run drawn
    on its own (e.g. light − dark: one classifier's two test sets, each seed its own)."""
    score, n = SCORES[metric], len(plus)

    def statistic(*codes: np.ndarray, axis: int = -1) -> np.ndarray:
        scores = [score(*np.divmod(c, k), k) for c in codes]
        return np.mean(scores[:n], axis=0) - np.mean(scores[n:], axis=0)

    runs = [*plus, *minus]
    return interval([r.true.to_numpy() * k + r.pred.to_numpy() for r in runs], statistic, resamples, seed)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p of the exact sign-flip permutation test (all 2**n sign patterns) that the
    per-seed differences are centred on zero; nan for fewer than two seeds."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return np.nan
    result = scipy.stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                          alternative="two-sided")
    return float(result.pvalue)


def smallest_p(n_seeds: int) -> float:
    """The smallest two-sided p the sign-flip test can give with n seeds: every seed on one side,
    2 / 2**n (5 seeds: 0.0625, so five seeds never reach p < 0.05)."""
    return min(1.0, 2.0 / 2**n_seeds)


def worst_group(accuracy_by_group: dict) -> tuple[object, float]:
    """(group, accuracy) of the lowest accuracy among the groups (e.g. skin types); ties: the first."""
    if not accuracy_by_group:
        return None, np.nan
    group = min(accuracy_by_group, key=lambda g: accuracy_by_group[g])
    return group, accuracy_by_group[group]


# --- per row of the report ------------------------------------------------------------------
# `runs`: one row per classifier and test set, with `seed`, `record` (the classifier's metrics
# JSON) and `predictions` (its run table, as described above).

def _classes(runs: pd.DataFrame) -> int:
    return len(runs.record.iloc[0]["labels"])


def _by_skin_type(record: dict) -> dict[int, float]:
    return {int(s): a for s, a in record["accuracy_pct_by_fitzpatrick_scale"].items()}


def most_frequent(values: Sequence) -> object:
    """The most frequent value; ties: the smallest."""
    counts = pd.Series(list(values)).value_counts()
    return min(counts[counts == counts.max()].index)


def row_intervals(runs: pd.DataFrame, keys: list[str], resamples: int, seed: int) -> pd.DataFrame:
    """Per group of `keys` (over seeds): the interval of the mean accuracy and macro F1, and the
    worst group (the skin type of lowest accuracy, per seed) as mean and sample std over seeds,
    with the skin type that was worst most often."""
    rows = []
    for key, g in runs.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        for m in METRICS:
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean_interval(list(g.predictions), m, _classes(g), resamples, seed)
        worst = [worst_group(_by_skin_type(r)) for r in g.record]
        row |= {"worst_group_pct_mean": np.mean([a for _, a in worst]),
                "worst_group_pct_std": np.std([a for _, a in worst], ddof=1) if len(worst) > 1 else np.nan,
                "worst_group_fitzpatrick_scale": most_frequent(s for s, _ in worst)}
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *(f"{m}_ci_{e}" for m in METRICS for e in ("low", "high")),
                                       "worst_group_pct_mean", "worst_group_pct_std", "worst_group_fitzpatrick_scale"])


def paired_tests(runs: pd.DataFrame, keys: list[str], dark: list[int], resamples: int,
                 seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """real+syn − real per group of `keys` (which leave out train_type): (over seeds, per seed).

    Per seed: the difference of each metric on the seed's test images with its paired interval,
    and the accuracy difference on the dark test images alone (skin types in `dark`). Over seeds:
    the mean difference, the interval of that mean (each seed's images drawn on their own), the
    sign-flip p over the per-seed differences and the smallest p the number of seeds allows.
    """
    per_seed, over = [], []
    for key, g in runs.groupby(keys, sort=False):
        k, seeds = _classes(g), []
        for s, pair in g.groupby("seed"):
            by_type = pair.set_index("train_type")
            if {"real", "real_syn"} <= set(by_type.index):
                both = paired(by_type.predictions["real"], by_type.predictions["real_syn"])
                seeds.append((s, both, both[both.fitzpatrick_scale.isin(dark)]))
        if not seeds:
            continue
        for s, both, dark_only in seeds:
            row = {**dict(zip(keys, key)), "seed": s, "n_test": len(both), "n_dark": len(dark_only)}
            for m in METRICS:
                row[f"{m}_diff"] = float(SCORES[m](both.true, both.pred_b, k) - SCORES[m](both.true, both.pred_a, k))
                row[f"{m}_diff_ci_low"], row[f"{m}_diff_ci_high"] = difference_interval([both], m, k, resamples, seed)
            row["dark_accuracy_pct_diff"] = (float(accuracy_pct(dark_only.true, dark_only.pred_b, k)
                                                   - accuracy_pct(dark_only.true, dark_only.pred_a, k))
                                             if len(dark_only) else np.nan)
            per_seed.append(row)
        mine = pd.DataFrame(per_seed[-len(seeds):])
        row = {**dict(zip(keys, key)), "n_seeds": len(seeds), "p_smallest": smallest_p(len(seeds)),
               "n_dark": int(mine.n_dark.sum())}
        for m, scope in (*((m, "all") for m in METRICS), ("accuracy_pct", "dark")):
            name = f"{m}_diff" if scope == "all" else "dark_accuracy_pct_diff"
            pairs = [both if scope == "all" else dark_only for _, both, dark_only in seeds]
            row[f"{name}_mean"] = mine[name].mean()
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (
                difference_interval(pairs, m, k, resamples, seed) if min(map(len, pairs)) else (np.nan, np.nan))
            row[f"{name}_p"] = sign_flip_p(mine[name].dropna())
        over.append(row)
    seed_columns = [*keys, "seed", "n_test", "n_dark", *(f"{m}_diff{e}" for m in METRICS
                                                         for e in ("", "_ci_low", "_ci_high")), "dark_accuracy_pct_diff"]
    over_columns = [*keys, "n_seeds", "p_smallest", "n_dark", *(f"{name}_{e}" for name in (
        *(f"{m}_diff" for m in METRICS), "dark_accuracy_pct_diff") for e in ("mean", "ci_low", "ci_high", "p"))]
    return pd.DataFrame(over, columns=over_columns), pd.DataFrame(per_seed, columns=seed_columns)


def light_dark(light: Sequence[pd.DataFrame], dark: Sequence[pd.DataFrame], k: int, resamples: int,
               seed: int) -> dict:
    """One classifier tested on a light and a dark set, once per seed (the ablation): intervals of
    the mean light and the mean dark accuracy and of light − dark."""
    out = {}
    out["light_ci_low"], out["light_ci_high"] = mean_interval(light, "accuracy_pct", k, resamples, seed)
    out["dark_ci_low"], out["dark_ci_high"] = mean_interval(dark, "accuracy_pct", k, resamples, seed)
    out["gap_ci_low"], out["gap_ci_high"] = contrast_interval(light, dark, "accuracy_pct", k, resamples, seed)
    return out

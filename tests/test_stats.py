"""Intervals, the sign-flip test and the worst group against answers known without a bootstrap."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from skinaug.report import stats

RESAMPLES, SEED = 10000, 0


def run(true, pred, fst=5, prefix="img") -> pd.DataFrame:
    """One classifier's predictions on len(true) test images."""
    true, pred = np.asarray(true), np.asarray(pred)
    return pd.DataFrame({"md5hash": [f"{prefix}{i}" for i in range(len(true))],
                         "fitzpatrick_scale": np.broadcast_to(fst, true.shape), "true": true, "pred": pred})


def fixed_accuracy(n: int, correct: int, k: int = 4) -> pd.DataFrame:
    true = np.arange(n) % k
    return run(true, np.where(np.arange(n) < correct, true, (true + 1) % k))


def test_all_correct_predictions_give_a_point_interval():
    perfect = run(np.arange(60) % 3, np.arange(60) % 3)
    assert stats.mean_interval([perfect], "accuracy_pct", 3, RESAMPLES, SEED) == (100.0, 100.0)
    assert stats.mean_interval([perfect], "f1_pct", 3, RESAMPLES, SEED) == (100.0, 100.0)


def test_a_fixed_accuracy_with_large_n_matches_the_normal_approximation():
    n, p = 4000, 0.7
    low, high = stats.mean_interval([fixed_accuracy(n, int(p * n))], "accuracy_pct", 4, RESAMPLES, SEED)
    half = 100 * 1.959964 * math.sqrt(p * (1 - p) / n)  # 1.42 points
    assert low == pytest.approx(70 - half, abs=0.15) and high == pytest.approx(70 + half, abs=0.15)


def test_each_seed_is_drawn_on_its_own():
    """A mean over an all-right and an all-wrong run is 50 in every draw; pooling the images would not be."""
    right, wrong = fixed_accuracy(40, 40), fixed_accuracy(40, 0)
    assert stats.mean_interval([right, wrong], "accuracy_pct", 4, RESAMPLES, SEED) == (50.0, 50.0)


def test_macro_f1_equals_sklearn_including_classes_never_predicted():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 5, (30, 40))
    pred = np.where(rng.random((30, 40)) < 0.5, true, rng.integers(0, 3, (30, 40)))  # 3 and 4 never predicted
    expected = [100 * f1_score(t, p, average="macro", labels=range(5), zero_division=0) for t, p in zip(true, pred)]
    assert stats.macro_f1_pct(true, pred, 5) == pytest.approx(expected)


def test_a_paired_difference_draws_the_same_images_for_both():
    """B is right on every image A gets right, and on 10 more: each draw's difference is >= 0, and the
    interval is far narrower than one that draws the two sets of images apart."""
    a, b = fixed_accuracy(200, 100), fixed_accuracy(200, 110)
    both = stats.paired(a, b)
    low, high = stats.difference_interval([both], "accuracy_pct", 4, RESAMPLES, SEED)
    assert 0 < low < 5 < high < 10
    apart_low, apart_high = stats.contrast_interval([b], [a], "accuracy_pct", 4, RESAMPLES, SEED)
    assert apart_low < 0 < apart_high and (high - low) < 0.5 * (apart_high - apart_low)
    same = stats.difference_interval([stats.paired(a, a)], "f1_pct", 4, RESAMPLES, SEED)
    assert same == (0.0, 0.0)


def test_a_pair_must_share_its_test_images():
    with pytest.raises(ValueError, match="same test images"):
        stats.paired(fixed_accuracy(10, 5), run(np.zeros(10, int), np.zeros(10, int), prefix="other"))


def test_intervals_are_seeded():
    data = [fixed_accuracy(50, 30)]
    assert stats.mean_interval(data, "accuracy_pct", 4, 1000, 7) == stats.mean_interval(data, "accuracy_pct", 4, 1000, 7)
    assert stats.mean_interval(data, "accuracy_pct", 4, 1000, 7) != stats.mean_interval(data, "accuracy_pct", 4, 1000, 8)


def test_too_few_images_give_no_interval():
    assert all(math.isnan(x) for x in stats.mean_interval([fixed_accuracy(1, 1)], "accuracy_pct", 4, 1000, 0))


@pytest.mark.parametrize(("differences", "p"), [
    ([1.0, 2.0, 3.0], 2 / 8),  # every seed gains: only the observed pattern and its mirror are as extreme
    ([1.0, -2.0, 3.0], 6 / 8),  # sums +6, +4, +2 of 8 patterns reach the observed +2, doubled
    ([3.0, -1.0], 1.0),  # sums 2, 4 of (4, 2, -2, -4) are >= 2: 2 x 2/4
    ([0.5] * 5, 2 / 32),  # five seeds: 0.0625 at best
])
def test_sign_flip_p_values_are_exact(differences, p):
    assert stats.sign_flip_p(differences) == pytest.approx(p)


def test_the_smallest_p_the_seeds_allow():
    assert [stats.smallest_p(n) for n in (1, 2, 3, 5, 6)] == [1.0, 0.5, 0.25, 0.0625, 0.03125]
    assert math.isnan(stats.sign_flip_p([4.0]))  # one seed: no test


def test_worst_group_of_a_constructed_table():
    assert stats.worst_group({1: 80.0, 5: 70.0, 6: 55.0}) == (6, 55.0)
    assert stats.worst_group({5: 50.0, 6: 50.0}) == (5, 50.0)  # a tie: the first
    runs = pd.DataFrame({"arch": ["a", "a", "a"], "seed": [0, 1, 2], "predictions": [fixed_accuracy(8, 4)] * 3,
                         "record": [{"labels": list("wxyz"), "accuracy_pct_by_fitzpatrick_scale": by}
                                    for by in ({"5": 60, "6": 40}, {"5": 30, "6": 50}, {"5": 70, "6": 20})]})
    row = stats.row_intervals(runs, ["arch"], 1000, 0).iloc[0]
    assert row.worst_group_pct_mean == pytest.approx(30.0) and row.worst_group_pct_std == pytest.approx(10.0)
    assert row.worst_group_fitzpatrick_scale == 6  # lowest in two seeds of three

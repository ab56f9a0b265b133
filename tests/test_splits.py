"""Flexible subsets and scenarios (skinaug.splits) on the demo world and, when
SKINAUG_FITZ_CSV is set, on the real metadata: both have the paper's Table 1 counts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skinaug import SkinaugError, config
from skinaug.data import fitzpatrick, splits

SEEDS = [0, 42, 123, 1111, 1234]
SIZES = {1: (1519, 56), 2: (1284, 291), 3: (1228, 291)}  # scenario: (train, test), SPEC §2
PINNED_MD5 = "75556ecbd0bd6227050112565c24b991"


@pytest.fixture(scope="module", params=["world", "real"])
def subset(request, repo_cfg) -> pd.DataFrame:
    if request.param == "world":
        meta = fitzpatrick.load_metadata(request.getfixturevalue("world_dir") / "metadata.csv", None)
    else:
        meta = fitzpatrick.load_metadata(request.getfixturevalue("fitz_csv"), PINNED_MD5)
    return fitzpatrick.study_subset(meta, repo_cfg.subset)


@pytest.fixture(scope="module")
def world_subset(world_dir, repo_cfg) -> pd.DataFrame:
    return fitzpatrick.study_subset(fitzpatrick.load_metadata(world_dir / "metadata.csv", None), repo_cfg.subset)


@pytest.mark.parametrize("sampling", ["pooled", "per_type"])
@pytest.mark.parametrize("seed", SEEDS)
def test_scenarios_have_exact_sizes_and_never_share_an_image(subset, repo_cfg, seed, sampling):
    cfg = repo_cfg.splits
    flex_light, flex_dark = splits.flexible_subsets(subset, seed, cfg, sampling)
    for flex, scales in ((flex_light, cfg.light), (flex_dark, cfg.dark)):
        assert len(flex) == 56 and flex["fitzpatrick_scale"].isin(scales).all()
        assert (flex["label"].value_counts() == 8).all() and flex["label"].nunique() == 7
        if sampling == "per_type":
            assert (flex.groupby(["label", "fitzpatrick_scale"]).size() == 4).all()
    for scenario, (n_train, n_test) in SIZES.items():
        parts = splits.scenario_splits(subset, scenario, seed, cfg, sampling)
        assert set(parts) == {"train", "test", "flex_light", "flex_dark"}
        assert (len(parts["train"]), len(parts["test"])) == (n_train, n_test)
        assert not set(parts["train"]["md5hash"]) & set(parts["test"]["md5hash"])
        assert not set(parts["train"]["md5hash"]) & set(flex_light["md5hash"])  # unused except in the ablation
        for name, frame in parts.items():
            assert list(frame.columns) == list(subset.columns), name
            assert frame.index.is_monotonic_increasing, name  # CSV order
        pd.testing.assert_frame_equal(parts["flex_dark"], flex_dark)
        test_is_flex = set(parts["test"]["md5hash"]) == set(flex_dark["md5hash"])
        assert test_is_flex == (scenario == 1)
        assert parts["test"]["fitzpatrick_scale"].isin(cfg.dark).all()
        assert parts["train"]["fitzpatrick_scale"].isin(cfg.dark).any() == (scenario != 3)


@pytest.mark.parametrize("sampling", ["pooled", "per_type"])
def test_splits_are_deterministic_and_depend_on_the_seed(world_subset, repo_cfg, sampling):
    a = splits.scenario_splits(world_subset, 2, 42, repo_cfg.splits, sampling)
    b = splits.scenario_splits(world_subset.copy(), 2, 42, repo_cfg.splits, sampling)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    other = splits.scenario_splits(world_subset, 2, 0, repo_cfg.splits, sampling)
    assert set(other["flex_dark"]["md5hash"]) != set(a["flex_dark"]["md5hash"])


@pytest.mark.parametrize("seed", SEEDS)
def test_pooled_is_the_authors_notebook(subset, repo_cfg, seed):
    # The released notebook, restated literally.
    light = subset[subset.fitzpatrick_scale.isin([1, 2])]
    dark = subset[subset.fitzpatrick_scale.isin([5, 6])]
    flex_light = light.groupby("label", group_keys=False).sample(n=8, random_state=seed)
    flex_dark = dark.groupby("label", group_keys=False).sample(n=8, random_state=seed)
    ours = splits.flexible_subsets(subset, seed, repo_cfg.splits, "pooled")
    pd.testing.assert_frame_equal(ours[0], flex_light.sort_index())
    pd.testing.assert_frame_equal(ours[1], flex_dark.sort_index())


def test_pooled_is_the_default(world_subset, repo_cfg):
    assert repo_cfg.splits.sampling == "pooled"
    a = splits.flexible_subsets(world_subset, 0, repo_cfg.splits)
    b = splits.flexible_subsets(world_subset, 0, repo_cfg.splits, "pooled")
    pd.testing.assert_frame_equal(a[1], b[1])


def test_refuses_unknown_scenario_and_impossible_draws(world_subset, repo_cfg):
    cfg = repo_cfg.splits
    with pytest.raises(config.ConfigError, match="scenario 4 does not exist; choose 1, 2 or 3"):
        splits.scenario_splits(world_subset, 4, 0, cfg)
    with pytest.raises(SkinaugError, match="per_label 7 does not divide evenly"):
        splits.flexible_subsets(world_subset, 0, config.replace(cfg, per_label=7), "per_type")
    # Prurigo nodularis has only 7 FST I images: 8 per type cannot be drawn, and the message says where.
    with pytest.raises(SkinaugError, match="only 7 light-skin rows for prurigo nodularis, 1;"):
        splits.flexible_subsets(world_subset, 0, config.replace(cfg, per_label=16), "per_type")
    with pytest.raises(SkinaugError, match="pooled or per_type"):
        splits.flexible_subsets(world_subset, 0, cfg, "random")
    doubled = pd.concat([world_subset, world_subset.iloc[:1]], ignore_index=True)
    with pytest.raises(SkinaugError, match="more than once"):
        splits.scenario_splits(doubled, 1, 0, cfg)


def test_duplicate_groups_find_the_worlds_copies(world_dir, world_subset):
    groups = splits.duplicate_groups(world_subset, world_dir / "images")
    sizes = groups.value_counts()
    assert 10 <= (sizes > 1).sum() <= 16  # the world re-saves 16 photos (1 %)
    # Copies were made within one label and skin type: no false match across them.
    keyed = world_subset.assign(group=groups)
    multi = keyed[keyed["group"].isin(sizes[sizes > 1].index)]
    assert (multi.groupby("group")[["label", "fitzpatrick_scale"]].nunique() == 1).all().all()


def test_dedupe_drops_train_rows_that_duplicate_a_test_row(world_dir, world_subset, repo_cfg):
    cfg = config.replace(repo_cfg.splits, dedupe=True)
    groups = splits.duplicate_groups(world_subset, world_dir / "images")
    with pytest.raises(SkinaugError, match="--images"):
        splits.scenario_splits(world_subset, 1, 0, cfg)
    dropped = 0
    for seed in SEEDS:
        for scenario, (n_train, n_test) in SIZES.items():
            parts = splits.scenario_splits(world_subset, scenario, seed, cfg, groups=groups)
            train_groups = set(groups[parts["train"].index])
            assert not train_groups & set(groups[parts["test"].index])
            assert len(parts["train"]) + len(parts["dedupe_dropped"]) == n_train and len(parts["test"]) == n_test
            dropped += len(parts["dedupe_dropped"])
    assert dropped > 0


def test_write_splits(world_dir, world_subset, repo_cfg, tmp_path):
    subset_csv = tmp_path / "available.csv"
    world_subset.to_csv(subset_csv, index=False)
    out = tmp_path / "scenario2" / "seed1111"
    sizes = splits.write_splits(subset_csv, out, 2, 1111, repo_cfg.splits, None)
    assert sizes == {"train": 1284, "test": 291, "flex_light": 56, "flex_dark": 56}
    assert sorted(p.name for p in out.iterdir()) == ["flex_dark.csv", "flex_light.csv", "split.json", "test.csv",
                                                     "train.csv"]
    assert splits.split_scenario(out, default=1) == 2  # what is trained on it knows its scenario
    assert splits.split_scenario(tmp_path, default=3) == 3  # a hand-made split: the caller's
    back = pd.read_csv(out / "test.csv", dtype={"md5hash": str})
    expected = splits.scenario_splits(world_subset, 2, 1111, repo_cfg.splits)["test"]
    assert back["md5hash"].tolist() == expected["md5hash"].tolist()
    deduped = splits.write_splits(subset_csv, tmp_path / "d", 1, 0, config.replace(repo_cfg.splits, dedupe=True),
                                  None, images_dir=world_dir / "images")
    assert deduped["train"] + deduped["dedupe_dropped"] == 1519
    assert Path(tmp_path / "d" / "dedupe_dropped.csv").exists()

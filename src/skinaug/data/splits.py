"""Flexible subsets and the three scenarios (SPEC §2), as pure DataFrame -> DataFrame functions.

    skinaug splits data/available.csv data/splits/scenario1/seed0 --scenario 1 --seed 0
    # full data: train 1519, test 56, flex_light 56, flex_dark 56

A flexible subset is `per_label` (8) images per label from light skin (FST 1-2) and
as many from dark skin (FST 5-6); everything else is non-flexible. Scenario sizes on
the full 1,631 rows (train -> test): 1: 1,519 -> 56, 2: 1,284 -> 291, 3: 1,228 -> 291.
Every frame keeps the subset's columns and CSV row order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from skinaug import SkinaugError, atomic, config
from skinaug.config import SplitsConfig

# Two photos are near-duplicates when their 24x24 grey thumbnails, with the smooth
# lighting removed (minus a Gaussian blur), correlate at least this much. Re-saved,
# resized or re-compressed copies score > 0.94; different lesions stay below ~0.85.
DUPLICATE_MIN_CORRELATION = 0.9


def flexible_subsets(subset_df: pd.DataFrame, seed: int, cfg: SplitsConfig,
                     sampling: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(flex_light, flex_dark): cfg.per_label rows per label from each skin group, seeded.

    pooled (default, the authors' released notebook, reproduced exactly): over the
        group's rows in CSV order, `rows.groupby("label", group_keys=False)
        .sample(n=per_label, random_state=seed)`.
    per_type (the paper's runs): per_label / len(types) rows from every (label,
        fitzpatrick_scale) cell, drawn by `rows.groupby(["label", "fitzpatrick_scale"],
        group_keys=False).sample(n=..., random_state=seed)`: one numpy RandomState
        seeded with `seed`, consumed cell by cell in sorted (label, type) order.
    Both come back in CSV order.
    """
    sampling = sampling or cfg.sampling
    if sampling not in config.SAMPLINGS:  # the CLI's --sampling may override params
        raise SkinaugError(f"splits.sampling is {sampling!r}; choose {' or '.join(config.SAMPLINGS)}")
    labels = sorted(subset_df["label"].unique())
    out = []
    for group, scales in (("light", cfg.light), ("dark", cfg.dark)):
        rows = subset_df[subset_df["fitzpatrick_scale"].isin(scales)]
        if sampling == "pooled":
            _need(rows, ["label"], [(label,) for label in labels], cfg.per_label, group)
            flex = rows.groupby("label", group_keys=False).sample(n=cfg.per_label, random_state=seed)
        else:
            if cfg.per_label % len(scales):
                raise SkinaugError(f"splits.per_label {cfg.per_label} does not divide evenly over the "
                                   f"{group} skin types {scales} (per_type sampling)")
            k = cfg.per_label // len(scales)
            _need(rows, ["label", "fitzpatrick_scale"], [(label, s) for label in labels for s in scales], k, group)
            flex = rows.groupby(["label", "fitzpatrick_scale"], group_keys=False).sample(n=k, random_state=seed)
        out.append(flex.sort_index())
    return out[0], out[1]


def scenario_splits(subset_df: pd.DataFrame, scenario: int, seed: int, cfg: SplitsConfig,
                    sampling: str | None = None, groups: pd.Series | None = None) -> dict[str, pd.DataFrame]:
    """{train, test, flex_light, flex_dark} for one scenario and seed (SPEC §2).

    1: dark non-flex + light non-flex -> dark flex
    2: dark flex + light non-flex -> dark non-flex
    3: light non-flex -> dark non-flex
    With cfg.dedupe, `groups` (duplicate_groups) names each row's near-duplicate group,
    and train loses every row that shares a group with a test row; those rows come back
    as "dedupe_dropped".
    """
    config.check_scenario(scenario)
    df = subset_df.reset_index(drop=True)
    repeated = df["md5hash"][df["md5hash"].duplicated()]
    if len(repeated):
        raise SkinaugError(f"md5hash {repeated.iloc[0]} appears more than once in the subset; fix the metadata")
    flex_light, flex_dark = flexible_subsets(df, seed, cfg, sampling)
    light = df[df["fitzpatrick_scale"].isin(cfg.light)].index
    dark = df[df["fitzpatrick_scale"].isin(cfg.dark)].index
    light_rest, dark_rest = light.difference(flex_light.index), dark.difference(flex_dark.index)
    train_idx, test_idx = {
        1: (dark_rest.union(light_rest), flex_dark.index),
        2: (flex_dark.index.union(light_rest), dark_rest),
        3: (light_rest, dark_rest),
    }[scenario]
    out = {"train": df.loc[train_idx.sort_values()], "test": df.loc[test_idx.sort_values()],
           "flex_light": flex_light, "flex_dark": flex_dark}
    if cfg.dedupe:
        if groups is None:
            raise SkinaugError("splits.dedupe needs the images to find duplicates: pass images_dir "
                               "(`skinaug splits ... --images data/images`)")
        groups = pd.Series(np.asarray(groups), index=df.index)
        clash = groups.loc[out["train"].index].isin(set(groups.loc[out["test"].index]))
        out["dedupe_dropped"] = out["train"][clash.to_numpy()]
        out["train"] = out["train"][~clash.to_numpy()]
    shared = set(out["train"]["md5hash"]) & set(out["test"]["md5hash"])
    assert not shared, f"train and test share {len(shared)} md5hash values"
    return out


def duplicate_groups(subset_df: pd.DataFrame, images_dir: str | Path) -> pd.Series:
    """A near-duplicate group id per row (rows whose images match share one), in row order.

    Matching is transitive (a~b and b~c put a, b, c in one group); see
    DUPLICATE_MIN_CORRELATION. Mirror images and heavy crops are not detected.
    """
    from PIL import Image, ImageFilter

    thumbs = []
    for md5 in subset_df["md5hash"]:
        with Image.open(Path(images_dir) / f"{md5}.jpg") as img:
            grey = img.convert("L").resize((24, 24), Image.BILINEAR)
        detail = np.asarray(grey, np.float32) - np.asarray(grey.filter(ImageFilter.GaussianBlur(3)), np.float32)
        detail = detail.ravel() - detail.mean()
        thumbs.append(detail / (np.linalg.norm(detail) + 1e-6))
    thumbs = np.stack(thumbs) if thumbs else np.zeros((0, 576), np.float32)
    parent = list(range(len(thumbs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    close = np.triu(thumbs @ thumbs.T >= DUPLICATE_MIN_CORRELATION, k=1)
    for i, j in zip(*np.nonzero(close)):
        parent[root(i)] = root(j)
    return pd.Series([root(i) for i in range(len(thumbs))], index=subset_df.index, name="duplicate_group")


def write_splits(subset_csv: Path, out_dir: Path, scenario: int, seed: int, cfg: SplitsConfig,
                 sampling: str | None = None, images_dir: Path | None = None) -> dict[str, int]:
    """Write out_dir/{train,test,flex_light,flex_dark}.csv and split.json atomically; return their sizes.

    split.json names the scenario and seed, so what is trained on the split records where it came
    from (the ablation's scenario 1 split sits beside a study of another scenario).
    """
    from skinaug.data import fitzpatrick

    df = fitzpatrick.load_metadata(subset_csv, None)
    groups = duplicate_groups(df, images_dir) if cfg.dedupe and images_dir is not None else None
    parts = scenario_splits(df, scenario, seed, cfg, sampling, groups)
    for name, frame in parts.items():
        atomic.write_csv(Path(out_dir) / f"{name}.csv", frame)
    atomic.write_json(Path(out_dir) / "split.json", {"scenario": scenario, "seed": seed})
    return {name: len(frame) for name, frame in parts.items()}


def split_scenario(split_dir: Path, default: int) -> int:
    """The scenario a split folder was written for (its split.json), or `default` for a hand-made one."""
    path = Path(split_dir) / "split.json"
    if not path.exists():
        return default
    return int(json.loads(path.read_text())["scenario"])


def _need(rows: pd.DataFrame, keys: list[str], cells: list[tuple], n: int, group: str) -> None:
    """Fail clearly (not with a pandas ValueError) when a cell has too few rows to draw n."""
    counts = rows.groupby(keys).size()
    for cell in cells:
        have = int(counts.get(cell if len(cell) > 1 else cell[0], 0))
        if have < n:
            raise SkinaugError(f"only {have} {group}-skin rows for {', '.join(map(str, cell))}; "
                               f"flexible subsets need {n} (splits.per_label)")

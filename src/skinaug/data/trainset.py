"""A split's training set as fine-tuning and generation read it: train.csv checked, its images opened.

    rows = trainset.read(split_dir / "train.csv")   # md5hash, label, fitzpatrick_scale (and the rest)
    image = trainset.open_image(images_dir / f"{md5hash}.jpg")
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from skinaug import SkinaugError
from skinaug.data import fitzpatrick

COLUMNS = ("md5hash", "label", "fitzpatrick_scale")  # what every reader of train.csv needs


def read(train_csv: Path) -> pd.DataFrame:
    """train.csv, once it parses and has COLUMNS."""
    try:
        train = fitzpatrick.read_table(train_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SkinaugError(f"cannot read {train_csv}: {e}") from None
    absent = [c for c in COLUMNS if c not in train.columns]
    if absent:
        raise SkinaugError(f"{train_csv} lacks column(s) {', '.join(absent)}")
    return train


def open_image(path: Path, resolution: int | None = None) -> Image.Image:
    """A training image as RGB; with resolution, bilinear to that square (as the authors' inference
    notebook resizes its sources)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for damaged files
        raise SkinaugError(f"cannot read training image {path}: {type(e).__name__}: {e}") from None
    return rgb if resolution is None else rgb.resize((resolution, resolution), Image.Resampling.BILINEAR)

"""Skin tone of an image as the individual typology angle (ITA), and checks of synthetic images.

ITA = arctan((L* - 50) / b*) * 180 / pi in CIELAB (Chardon et al. 1991): above 55 very
light, 41..55 light, 28..41 intermediate, 10..28 tan, -30..10 brown, below -30 dark.
A lesion is not skin, so the estimate uses the pixels closest to the image's dominant
colour (the half of the pixels nearest the median L*a*b*), which ignores a lesion
covering less than about half the image.

    skinaug tone data/splits/scenario1/seed0 data/images reports/tone --syn-dir data/synthetic/scenario1/seed0
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinaug import SkinaugError, atomic
from skinaug.data import fitzpatrick

# Chardon's ITA classes, and the band we expect for each Fitzpatrick type (lower, upper).
ITA_CLASSES = [(55, "very light"), (41, "light"), (28, "intermediate"), (10, "tan"), (-30, "brown"), (-90, "dark")]
EXPECTED_ITA = {1: (41, 90), 2: (28, 55), 3: (10, 41), 4: (-30, 28), 5: (-60, 10), 6: (-90, -30)}
GROUPS = ("real light", "real dark", "synthetic from light", "synthetic from dark")  # from light: the method's work
SKIN_SHARE = 0.5  # share of pixels, nearest the dominant colour, taken as skin


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float RGB (H, W, 3) -> CIELAB (D65), via scikit-image."""
    from skimage.color import rgb2lab

    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float64) / 255.0
    return rgb2lab(rgb)


def ita(lightness, b_star):
    """ITA in degrees, exactly the formula; b* = 0 (a grey pixel) gives +-90."""
    lightness, b_star = np.asarray(lightness, float), np.asarray(b_star, float)
    with np.errstate(divide="ignore"):
        return np.degrees(np.arctan((lightness - 50.0) / b_star))


def skin_ita(rgb: np.ndarray, skin_share: float = SKIN_SHARE) -> float:
    """ITA of the skin in one image: the median L*, b* of the pixels nearest the dominant colour."""
    lab = rgb_to_lab(rgb).reshape(-1, 3)
    distance = np.linalg.norm(lab - np.median(lab, axis=0), axis=1)
    keep = distance <= np.quantile(distance, skin_share)
    lightness, _, b_star = np.median(lab[keep], axis=0)
    return float(ita(lightness, b_star))


def ita_class(value: float) -> str:
    for lower, name in ITA_CLASSES:
        if value > lower:
            return name
    return "dark"


def in_expected_band(value: float, fitzpatrick_scale: int) -> bool:
    lower, upper = EXPECTED_ITA[int(fitzpatrick_scale)]
    return lower <= value <= upper


def in_dark_range(value: float) -> bool:
    """In FST 5's or FST 6's band: dark, whichever of the two dark types (the demo base cannot be
    relied on to tell them apart from light sources: README, "FST 5 is not reached everywhere")."""
    return in_expected_band(value, 5) or in_expected_band(value, 6)


def measure(paths: list[Path]) -> np.ndarray:
    values = []
    for path in paths:
        try:
            with Image.open(path) as img:
                values.append(skin_ita(np.asarray(img.convert("RGB"))))
        except (OSError, FileNotFoundError) as e:
            raise SkinaugError(f"cannot read image {path}: {e}") from None
    return np.array(values)


def tone_table(split_dir: Path, images_dir: Path, syn_dir: Path | None, light: list[int]) -> pd.DataFrame:
    """One row per image: group (GROUPS; synthetic by its source's type), fitzpatrick_scale, ITA."""
    rows = []
    for split in ("train", "test"):
        df = fitzpatrick.read_table(Path(split_dir) / f"{split}.csv")
        values = measure([Path(images_dir) / f"{m}.jpg" for m in df.md5hash])
        for (_, row), value in zip(df.iterrows(), values):
            group = "real light" if row.fitzpatrick_scale in light else "real dark"
            rows.append({"group": group, "split": split, "md5hash": row.md5hash, "label": row.label,
                         "fitzpatrick_scale": int(row.fitzpatrick_scale), "ita": value})
    if syn_dir is not None:
        manifest = fitzpatrick.read_table(Path(syn_dir) / "manifest.csv")
        values = measure([Path(syn_dir) / f for f in manifest.file])
        for (_, row), value in zip(manifest.iterrows(), values):
            source = int(row.source_fitzpatrick_scale)
            rows.append({"group": "synthetic from light" if source in light else "synthetic from dark",
                         "split": "train", "md5hash": row.file, "label": row.label,
                         "fitzpatrick_scale": int(row.fitzpatrick_scale), "ita": value,
                         "source_fitzpatrick_scale": source})
    table = pd.DataFrame(rows).drop_duplicates(subset=["group", "md5hash"])
    table["in_band"] = [in_expected_band(v, s) for v, s in zip(table.ita, table.fitzpatrick_scale)]
    return table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Median and quartiles of ITA per group and Fitzpatrick type, and the share in the expected band."""
    grouped = table.groupby(["group", "fitzpatrick_scale"]).ita
    summary = pd.DataFrame({
        "n": grouped.size(),
        "ita_median": grouped.median(),
        "ita_q25": grouped.quantile(0.25),
        "ita_q75": grouped.quantile(0.75),
        "in_band_pct": table.groupby(["group", "fitzpatrick_scale"]).in_band.mean() * 100,
    }).reset_index()
    return summary.round(2)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, s) for g in GROUPS
              for s in sorted(table.loc[table.group == g, "fitzpatrick_scale"].unique())]
    # 8 inches at 110 dpi: shown 1:1 in a markdown page; each group's name wraps onto its own lines
    fig, ax = plt.subplots(figsize=(8, 4.4))
    ax.boxplot([table.loc[(table.group == g) & (table.fitzpatrick_scale == s), "ita"] for g, s in groups],
               showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), [f"{g.replace(' from ', chr(10) + 'from ')}\nFST {s}" for g, s in groups],
                  fontsize=8)
    ax.set_ylabel("skin ITA (degrees; lower = darker)", fontsize=9)
    ax.set_title("Skin tone of real and synthetic images (synthetic: by requested type)", fontsize=10)
    ax.axhline(10, color="grey", lw=0.5, ls="--")
    ax.axhline(-30, color="grey", lw=0.5, ls="--")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_tone_report(split_dir: Path, images_dir: Path, syn_dir: Path | None, out_dir: Path,
                      light: list[int]) -> pd.DataFrame:
    """ITA per image (tone.csv), the summary (tone_summary.csv / .md) and the figure (tone.png)."""
    out_dir = Path(out_dir)
    table = tone_table(split_dir, images_dir, syn_dir, light)
    summary = summarise(table)
    atomic.write_csv(out_dir / "tone.csv", table)
    atomic.write_csv(out_dir / "tone_summary.csv", summary)
    atomic.write_text(out_dir / "tone_summary.md", "# Skin tone (ITA) per group and Fitzpatrick type\n\n"
                      + summary.to_markdown(index=False) + "\n")
    plot(table, out_dir / "tone.png")
    return summary

"""What the generator made, measured per requested skin type and label (issue 17).

    skinaug quality data/splits/scenario1/seed0 data/images data/synthetic/scenario1/seed0 \
        reports/quality/scenario1/seed0 --reference models/scenario1/seed0/reference.pt \
        --metrics reports/quality/scenario1/metrics_seed0.json --title "scenario 1, seed 0" --seed 0

Against a reference set of real images of the requested skin type (never the test split):

- Fréchet distance (FD) and kernel distance (KID, unbiased MMD² with a cubic polynomial kernel)
  on image features, through torchmetrics (FrechetInceptionDistance / KernelInceptionDistance
  given our own feature module): quality.features "dinov2" (the paper profile: DINOv2's CLS
  embedding, Stein et al. 2023) or "classifier" (the demo: the reference classifier's
  penultimate layer, offline).
- Precision, recall, density and coverage of k-NN manifolds (Kynkäänniemi et al. 2019, Naeem et
  al. 2020): fidelity and diversity apart.
- Lesion kept: the reference classifier (real training images only) classifies each synthetic
  image; its accuracy against the source's label (GAN-test, Shmelkov et al. 2018).
- Tone moved: ITA of the source and of the synthetic image (tone.skin_ita), and the share in the
  requested type's band (tone.EXPECTED_ITA).

The reference set of a skin type is its real images in the split's CSVs other than test.csv
(train, flex_light, flex_dark), less any test.csv image: scenario 1 and 2 use their dark training
images (scenario 2's are the dark flexible subset), scenario 3, which trains on light skin only,
uses the dark flexible subset (neither trained nor tested on there). Every table names it with
its counts. Seconds in the demo; minutes on a GPU in the paper profile (DINOv2 over ~8,000 images).

One module, over 300 lines, for one idea: one table of measures per synthetic image and their
summaries; the figures read that table and nothing else.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import cdist
from torch import nn
from tqdm import tqdm

from skinaug import SkinaugError, atomic, tone
from skinaug.classify import classifiers
from skinaug.config import FEATURES, Config
from skinaug.data import fitzpatrick
from skinaug.diffusion import sd21

REFERENCE_SPLITS = ("train", "flex_light", "flex_dark")  # where reference images may come from; never test
EVAL_BATCH = 64  # images per forward pass (memory only: eval mode, no batch statistics)
HEADLINE = ("fd", "kid", "precision", "recall", "lesion_kept_pct", "tone_in_band_pct")  # metrics.json
REFERENCE_KEYS = ("fitzpatrick_scale", "label")  # what a group's reference set matches


# --- distances and manifolds on features ---------------------------------------------------

class _Given(nn.Module):
    """torchmetrics' custom feature extractor, for features already computed: the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(ref: np.ndarray, syn: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets (torchmetrics' FID with our features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(ref) < 2 or len(syn) < 2:
        return math.nan
    fid = FrechetInceptionDistance(feature=_Given(ref.shape[1]))
    fid.update(torch.as_tensor(ref, dtype=torch.float64), real=True)
    fid.update(torch.as_tensor(syn, dtype=torch.float64), real=False)
    return max(float(fid.compute()), 0.0)  # rounding can leave -1e-12 for identical sets


def kernel_distance(ref: np.ndarray, syn: np.ndarray, subsets: int, subset_size: int, seed: int) -> float:
    """KID: the unbiased MMD² (cubic polynomial kernel) averaged over random subsets of
    min(subset_size, both set sizes) images a side (torchmetrics), its draws seeded."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(ref), len(syn))
    if size < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Given(ref.shape[1]), subsets=subsets, subset_size=size)
    kid.update(torch.as_tensor(ref, dtype=torch.float64), real=True)
    kid.update(torch.as_tensor(syn, dtype=torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # its subsets come from torch.randperm
        mean, _ = kid.compute()
    return float(mean)


def manifold_scores(ref: np.ndarray, syn: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each real image's ball reaches its k-th nearest real neighbour, each synthetic one's its k-th
    nearest synthetic neighbour. precision: share of synthetic images inside some real ball;
    recall: share of real images inside some synthetic ball; density: real balls holding each
    synthetic image, over k, averaged (1 when the sets match, above 1 when crowded near reals);
    coverage: share of real balls holding a synthetic image. NaN when a set has k images or fewer.
    """
    if len(ref) <= k or len(syn) <= k:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
    ref_radii = _kth_neighbour(ref, k)
    syn_radii = _kth_neighbour(syn, k)
    distances = cdist(ref, syn)
    inside = distances < ref_radii[:, None]  # real i's ball holds synthetic j
    syn_inside = distances < syn_radii[None, :]  # synthetic j's ball holds real i
    return {"precision": float(inside.any(axis=0).mean()), "recall": float(syn_inside.any(axis=1).mean()),
            "density": float(inside.sum(axis=0).mean() / k), "coverage": float(inside.any(axis=1).mean())}


def _kth_neighbour(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance of each point to its k-th nearest other point, in row chunks (no n x n matrix for
    thousands of synthetic images). scipy's cdist computes each pair the same way in every call,
    so a point at exactly that distance is never counted inside."""
    return np.concatenate([np.partition(cdist(x[i:i + chunk], x), k, axis=1)[:, k]  # column 0: itself
                           for i in range(0, len(x), chunk)])


def set_scores(ref: np.ndarray, syn: np.ndarray, cfg: Config, seed: int) -> dict[str, float]:
    q = cfg.quality
    return {"fd": frechet_distance(ref, syn), "kid": kernel_distance(ref, syn, q.kid_subsets, q.kid_subset_size, seed),
            **manifold_scores(ref, syn, q.nearest_k)}


# --- features and the reference classifier's beliefs ---------------------------------------

@torch.no_grad()
def classifier_pass(model: nn.Module, paths: list[str], cfg: Config, device: torch.device
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, log-probabilities) of the reference classifier on each image,
    under classify's test transform (Resize + CenterCrop)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # reference_head's output layer
    caught = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: caught.append(inputs[0].detach().cpu()))
    logps = []
    try:
        for batch in tqdm(_chunks(paths), desc="reference classifier", leave=False):
            images = classifiers.decode_images(batch, cfg.classify.image_size).to(device)
            logps.append(model(classifiers.eval_view(images, cfg.classify.crop_size)).cpu())
    finally:
        hook.remove()
    return torch.cat(caught).double().numpy(), torch.cat(logps).double().numpy()


def load_dinov2(cfg: Config, device: torch.device) -> nn.Module:
    """DINOv2 (transformers) from quality.dinov2 at quality.revision: a hub id or a local folder."""
    from transformers import Dinov2Model

    q = cfg.quality
    try:
        model = Dinov2Model.from_pretrained(q.dinov2, revision=q.revision)
    except (OSError, ValueError) as e:  # offline or absent: OSError; a path that is no hub id: ValueError
        raise SkinaugError(f"DINOv2 {q.dinov2!r} (revision {q.revision}) could not be loaded ({e.__class__.__name__}); "
                           "offline? download it on a connected machine (huggingface-cli download "
                           f"{q.dinov2} --revision {q.revision}) or set quality.features: classifier") from None
    return model.to(device).eval()


@torch.no_grad()
def dinov2_features(model: nn.Module, paths: list[str], cfg: Config, device: torch.device) -> np.ndarray:
    """DINOv2's CLS embedding (pooler_output) of each image: Resize + CenterCrop to
    quality.image_size, ImageNet normalisation."""
    out = []
    for batch in tqdm(_chunks(paths), desc="DINOv2 features", leave=False):
        images = classifiers.decode_images(batch, cfg.quality.image_size).to(device)
        out.append(model(pixel_values=classifiers.normalise(images.float() / 255)).pooler_output.cpu())
    return torch.cat(out).double().numpy()


def _chunks(paths: list[str]) -> list[list[str]]:
    return [paths[i:i + EVAL_BATCH] for i in range(0, len(paths), EVAL_BATCH)]


# --- the reference set ---------------------------------------------------------------------

def reference_rows(split_dir: Path) -> pd.DataFrame:
    """Real images that may stand as the reference: REFERENCE_SPLITS' rows (a `source` column names
    the CSV) less every test.csv image; each image once, under the first CSV that has it."""
    split_dir = Path(split_dir)
    test = set(fitzpatrick.read_table(split_dir / "test.csv").md5hash) if (split_dir / "test.csv").exists() else set()
    parts = [fitzpatrick.read_table(split_dir / f"{name}.csv").assign(source=name)
             for name in REFERENCE_SPLITS if (split_dir / f"{name}.csv").exists()]
    if not parts:
        raise SkinaugError(f"{split_dir} holds none of {', '.join(f'{n}.csv' for n in REFERENCE_SPLITS)}: "
                           "run the splits stage first")
    rows = pd.concat(parts, ignore_index=True).drop_duplicates("md5hash")
    rows = rows[~rows.md5hash.isin(test)].reset_index(drop=True)
    assert not set(rows.md5hash) & test, "a test image in the reference set"
    return rows


def describe(rows: pd.DataFrame) -> str:
    """'train 112 + flex_dark 8' (per CSV, in REFERENCE_SPLITS order), or 'no reference'."""
    counts = rows.source.value_counts()
    parts = [f"{name} {counts[name]}" for name in REFERENCE_SPLITS if counts.get(name, 0)]
    return " + ".join(parts) if parts else "no reference"


# --- the stage -----------------------------------------------------------------------------

def per_image(split_dir: Path, images_dir: Path, syn_dir: Path, model: nn.Module, labels: list[str], cfg: Config,
              device: torch.device) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    """(synthetic table, their features, reference table, its features).

    The synthetic table: the manifest's columns plus ita_source, ita, ita_shift, in_band,
    predicted, p_label (the reference classifier's probability of the source's label),
    lesion_kept, and nearest_ref (feature distance to the nearest reference image of the
    requested type: small = like some real image).
    """
    manifest = fitzpatrick.read_table(Path(syn_dir) / "manifest.csv")
    unknown = sorted(set(manifest.label) - set(labels))
    if unknown:
        raise SkinaugError(f"synthetic images of labels not in subset.labels: {', '.join(unknown)}; "
                           "re-run generate with these settings")
    ref = reference_rows(split_dir)
    ref = ref[ref.fitzpatrick_scale.isin(set(manifest.fitzpatrick_scale))].reset_index(drop=True)
    syn_paths = [str(Path(syn_dir) / f) for f in manifest.file]
    ref_paths = [str(Path(images_dir) / f"{m}.jpg") for m in ref.md5hash]
    syn_feat, logp = classifier_pass(model, syn_paths, cfg, device)
    if cfg.quality.features == "classifier":
        ref_feat = classifier_pass(model, ref_paths, cfg, device)[0] if len(ref) else np.zeros((0, syn_feat.shape[1]))
    else:
        dino = load_dinov2(cfg, device)
        syn_feat = dinov2_features(dino, syn_paths, cfg, device)
        ref_feat = dinov2_features(dino, ref_paths, cfg, device) if len(ref) else np.zeros((0, syn_feat.shape[1]))
    target = np.array([labels.index(x) for x in manifest.label])
    sources = manifest.source_md5hash.drop_duplicates()
    source_ita = dict(zip(sources, tone.measure([Path(images_dir) / f"{m}.jpg" for m in sources])))
    table = manifest.copy()
    table["ita_source"] = table.source_md5hash.map(source_ita)
    table["ita"] = tone.measure([Path(p) for p in syn_paths])
    table["ita_shift"] = table.ita - table.ita_source
    table["in_band"] = [tone.in_expected_band(v, s) for v, s in zip(table.ita, table.fitzpatrick_scale)]
    table["predicted"] = [labels[i] for i in logp.argmax(1)]
    table["p_label"] = np.exp(logp[np.arange(len(table)), target])
    table["lesion_kept"] = table.predicted == table.label
    table["nearest_ref"] = math.nan
    for fst, idx in table.groupby("fitzpatrick_scale").indices.items():
        ref_idx = np.flatnonzero(ref.fitzpatrick_scale.to_numpy() == fst)
        if len(ref_idx):
            table.loc[table.index[idx], "nearest_ref"] = cdist(syn_feat[idx], ref_feat[ref_idx]).min(1)
    return table, syn_feat, ref, ref_feat


def group_scores(table: pd.DataFrame, syn_feat: np.ndarray, ref: pd.DataFrame, ref_feat: np.ndarray,
                 keys: list[str], cfg: Config, seed: int) -> pd.DataFrame:
    """One row per group of the synthetic images by `keys` (requested fitzpatrick_scale, label,
    source_fitzpatrick_scale), against the reference images of the same requested type and label;
    keys [] pools everything."""
    rows = []
    groups = table.groupby(keys).indices.items() if keys else [((), np.arange(len(table)))]
    for key, idx in groups:
        key = key if isinstance(key, tuple) else (key,)
        mask = np.ones(len(ref), dtype=bool)
        for name, value in zip(keys, key):
            if name in REFERENCE_KEYS:  # the source's type is the synthetic image's, not the reference's
                mask &= ref[name].to_numpy() == value
        part = table.iloc[idx]
        rows.append({**dict(zip(keys, key)), "reference": describe(ref[mask]), "n_ref": int(mask.sum()),
                     "n_syn": len(idx), **set_scores(ref_feat[mask], syn_feat[idx], cfg, seed),
                     "lesion_kept_pct": 100 * part.lesion_kept.mean(), "tone_in_band_pct": 100 * part.in_band.mean(),
                     "ita_source_median": part.ita_source.median(), "ita_median": part.ita.median(),
                     "ita_shift_median": part.ita_shift.median()})
    return pd.DataFrame(rows)


def headline(pooled: pd.Series, features: str) -> dict:
    """metrics.json: the pooled row's HEADLINE numbers (null where undefined) and what they rest on."""
    def num(v):
        return None if pd.isna(v) else round(float(v), 4)

    return {**{k: num(pooled[k]) for k in HEADLINE}, "n_syn": int(pooled.n_syn), "n_ref": int(pooled.n_ref),
            "features": features}


def markdown(by_type: pd.DataFrame, by_source: pd.DataFrame, by_label: pd.DataFrame, cfg: Config, title: str) -> str:
    feat = {"classifier": f"the reference classifier's penultimate layer ({cfg.quality.arch}, real training images)",
            "dinov2": f"DINOv2 CLS embeddings ({cfg.quality.dinov2} @ {cfg.quality.revision})"}[cfg.quality.features]
    return "\n".join([
        f"## Synthetic-image quality: {title}", "",
        f"Features: {feat}. Reference: real images of the requested skin type from the split's non-test CSVs "
        "(column `reference`: images per CSV; never test.csv). FD and KID: lower is closer; precision, recall, "
        "coverage in [0, 1], density 1 when the sets match. Lesion kept: the reference classifier's accuracy on "
        "the synthetic images against their source's label. Tone in band: share whose skin ITA falls in the "
        "requested type's band. NaN: too few images for the measure.", "",
        "### Per requested skin type", "", _md(by_type), "",
        "### Per source skin type → requested skin type (light sources: the method's work)", "", _md(by_source), "",
        "### Per requested skin type and label", "", _md(by_label), "",
        "![ITA shift against lesion kept](ita_vs_lesion.png)", "",
        "![Best and worst synthetic images by each measure](grid.png)", ""])


def _md(frame: pd.DataFrame) -> str:
    return frame.rename(columns={"fitzpatrick_scale": "FST", "source_fitzpatrick_scale": "source FST"}
                        ).round(3).to_markdown(index=False)


def plot_shift_vs_kept(table: pd.DataFrame, path: Path) -> None:
    """One point per label and requested type: median ITA shift (x) against lesion kept (y), over the
    images asked to change skin type (a light source; a dark source is redrawn at its own type),
    or over all images when none was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moved = table.source_fitzpatrick_scale != table.fitzpatrick_scale
    which = "images asked to change skin type" if moved.any() else "all images (none asked to change type)"
    table = table[moved] if moved.any() else table
    by_label = table.groupby(["fitzpatrick_scale", "label"]).agg(
        ita_shift_median=("ita_shift", "median"), lesion_kept_pct=("lesion_kept", "mean")).reset_index()
    by_label["lesion_kept_pct"] *= 100
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fst, part in by_label.groupby("fitzpatrick_scale"):
        ax.scatter(part.ita_shift_median, part.lesion_kept_pct, label=f"FST {fst}", s=36)
        for _, r in part.iterrows():
            ax.annotate(r.label, (r.ita_shift_median, r.lesion_kept_pct), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("median ITA shift, synthetic - source (degrees; negative = darker)")
    ax.set_ylabel("lesion kept (%): reference classifier right")
    ax.set_ylim(-5, 105)
    ax.axvline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(f"Did the skin darken, and did the lesion survive? Per label, {which}", fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# measure -> (column, higher is better, title). tone: distance outside the requested band (0 inside).
GRID_MEASURES = {"lesion": ("p_label", True, "lesion: reference classifier's p(source label)"),
                 "tone": ("band_miss", False, "tone: degrees outside the requested ITA band"),
                 "realism": ("nearest_ref", False, "realism: feature distance to the nearest reference")}


def band_miss(table: pd.DataFrame) -> pd.Series:
    lower = table.fitzpatrick_scale.map(lambda s: tone.EXPECTED_ITA[int(s)][0])
    upper = table.fitzpatrick_scale.map(lambda s: tone.EXPECTED_ITA[int(s)][1])
    return np.maximum(0, np.maximum(lower - table.ita, table.ita - upper))


def plot_grid(table: pd.DataFrame, syn_dir: Path, n: int, path: Path) -> None:
    """Per measure of GRID_MEASURES, a row of the n best and a row of the n worst synthetic images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    table = table.assign(band_miss=band_miss(table))
    n = max(1, min(n, len(table)))
    rows = len(GRID_MEASURES) * 2
    width, height, names = 1.6 * n, 1.9 * rows, 0.9  # inches; names: the left margin for each row's name
    # no ticks and a fixed layout: making 36 axes' ticks and tight_layout took 0.4 of the plot's 1.1 s
    fig, axes = plt.subplots(rows, n, figsize=(width + names, height), squeeze=False,
                             subplot_kw={"xticks": [], "yticks": []},
                             gridspec_kw={"left": names / (width + names), "right": 0.99, "bottom": 0.01,
                                          "top": 1 - 0.6 / height, "wspace": 0.08, "hspace": 0.45})
    for r, (name, (column, higher, title)) in enumerate(GRID_MEASURES.items()):
        ranked = table.dropna(subset=[column]).sort_values(column, ascending=not higher, kind="stable")
        for half, picks in (("best", ranked.head(n)), ("worst", ranked.tail(n)[::-1])):
            row = 2 * r + (half == "worst")
            for c in range(n):
                ax = axes[row, c]
                ax.axis("off")
                if c >= len(picks):
                    continue
                item = picks.iloc[c]
                with Image.open(Path(syn_dir) / item.file) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
                ax.set_title(f"{item.label[:14]}\nFST {item.fitzpatrick_scale}, {item[column]:.2g}", fontsize=6)
            axes[row, 0].text(-0.1, 0.5, f"{name}\n{half}", transform=axes[row, 0].transAxes, ha="right",
                              va="center", fontsize=8)
    fig.suptitle("; ".join(title for _, _, title in GRID_MEASURES.values()), fontsize=7)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(split_dir: Path, images_dir: Path, syn_dir: Path, reference: Path, out_dir: Path, metrics_json: Path,
        cfg: Config, seed: int, title: str, weights: Path | None = None) -> dict:
    """Measure one generate output; write per_image.csv, by_type.csv, by_source_type.csv,
    by_type_label.csv, quality.md, ita_vs_lesion.png and grid.png into out_dir, and the headline
    into metrics_json. weights: the reference's backbone file (classifiers.load_reference)."""
    assert cfg.quality.features in FEATURES
    out_dir = Path(out_dir)
    device = sd21.pick_device(cfg.model.device)
    model, labels = classifiers.load_reference(reference, cfg, device, weights)
    table, syn_feat, ref, ref_feat = per_image(split_dir, images_dir, syn_dir, model, labels, cfg, device)
    by_type = group_scores(table, syn_feat, ref, ref_feat, ["fitzpatrick_scale"], cfg, seed)
    by_source = group_scores(table, syn_feat, ref, ref_feat, ["source_fitzpatrick_scale", "fitzpatrick_scale"],
                             cfg, seed)
    by_label = group_scores(table, syn_feat, ref, ref_feat, ["fitzpatrick_scale", "label"], cfg, seed)
    pooled = group_scores(table, syn_feat, ref, ref_feat, [], cfg, seed).assign(fitzpatrick_scale="all")
    by_type = pd.concat([by_type, pooled], ignore_index=True)
    atomic.write_csv(out_dir / "per_image.csv", table)
    atomic.write_csv(out_dir / "by_type.csv", by_type)
    atomic.write_csv(out_dir / "by_source_type.csv", by_source)
    atomic.write_csv(out_dir / "by_type_label.csv", by_label)
    atomic.write_text(out_dir / "quality.md", markdown(by_type, by_source, by_label, cfg, title))
    plot_shift_vs_kept(table, out_dir / "ita_vs_lesion.png")
    plot_grid(table, syn_dir, cfg.quality.grid, out_dir / "grid.png")
    head = headline(pooled.iloc[0], cfg.quality.features)
    atomic.write_json(metrics_json, head)
    return head


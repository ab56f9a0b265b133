"""Synthetic-image quality: distances on known cases, k-NN manifolds on constructed point sets,
lesion kept with a classifier right by construction, the reference set, DINOv2 from a tiny local
model, and the whole measure on a tiny study. CPU, seconds; nothing touches the network."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from skinaug import SkinaugError, config, tone
from skinaug.classify import classifiers, quality
from skinaug.report import results

from test_classifiers import LABELS, small_cfg, write_study

ROOT = Path(__file__).resolve().parents[1]


# --- distances -----------------------------------------------------------------------------

def closed_form_fd(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), with scipy's matrix square root."""
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root))


def test_fd_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert quality.frechet_distance(x, x.copy()) == pytest.approx(0, abs=1e-6)


def test_fd_of_a_shifted_copy_is_the_squared_shift():
    x = np.random.default_rng(1).normal(size=(300, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert quality.frechet_distance(x, x + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)


def test_fd_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(2)
    mu2, var1, var2 = np.array([1.0, 0.0, -1.0]), np.array([1.0, 2.0, 0.5]), np.array([4.0, 1.0, 0.5])
    a = rng.normal(size=(40000, 3)) * np.sqrt(var1)
    b = mu2 + rng.normal(size=(40000, 3)) * np.sqrt(var2)
    expected = closed_form_fd(np.zeros(3), np.diag(var1), mu2, np.diag(var2))  # 2 + (1 + 4 - 4) + (2 + 1 - 2.83)
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    # and on the samples' own moments, to rounding
    sample = closed_form_fd(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert quality.frechet_distance(a, b) == pytest.approx(sample, rel=1e-6)


def test_fd_needs_two_images_a_side():
    assert math.isnan(quality.frechet_distance(np.zeros((1, 3)), np.ones((5, 3))))


def _poly(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3


def test_kid_with_one_subset_of_everything_is_the_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 4)), rng.normal(0.5, 1, size=(12, 4))
    m = len(x)
    kxx, kyy, kxy = _poly(x, x), _poly(y, y), _poly(x, y)
    unbiased = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert quality.kernel_distance(x, y, subsets=3, subset_size=12, seed=0) == pytest.approx(unbiased, rel=1e-9)


def test_kid_is_unbiased_at_small_n():
    """Sets of 6 from one distribution: the mean KID over many draws is 0 (a biased V-statistic is not)."""
    rng = np.random.default_rng(4)
    kids, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
        kids.append(quality.kernel_distance(x, y, subsets=1, subset_size=6, seed=0))
        biased.append(_poly(x, x).mean() + _poly(y, y).mean() - 2 * _poly(x, y).mean())
    kids = np.array(kids)
    assert abs(kids.mean()) < 3 * kids.std() / math.sqrt(len(kids))
    assert np.mean(biased) > 5 * np.std(biased) / math.sqrt(len(biased))  # the test can tell bias apart


def test_kid_sees_a_shift_and_its_subsets_are_seeded():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    same = quality.kernel_distance(x, y, subsets=20, subset_size=10, seed=1)
    assert quality.kernel_distance(x, y + 2, subsets=20, subset_size=10, seed=1) > same + 0.5
    assert quality.kernel_distance(x, y, subsets=20, subset_size=10, seed=1) == same
    assert quality.kernel_distance(x, y, subsets=20, subset_size=10, seed=2) != same


# --- precision, recall, density, coverage --------------------------------------------------

def test_identical_sets_have_full_precision_recall_coverage_and_density_one():
    x = np.random.default_rng(6).normal(size=(100, 3))
    scores = quality.manifold_scores(x, x.copy(), k=5)
    assert scores == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_far_sets_score_zero():
    x = np.random.default_rng(7).normal(size=(50, 3))
    assert quality.manifold_scores(x, x + 100, k=3) == dict.fromkeys(("precision", "recall", "density", "coverage"), 0.0)


def test_a_faithful_but_narrow_set_has_precision_without_recall():
    """Synthetic points copy one cluster of two: all realistic (precision 1), half the reals missed."""
    rng = np.random.default_rng(8)
    ref = np.concatenate([rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + 50])
    syn = ref[:60] + rng.normal(scale=0.01, size=(60, 2))
    scores = quality.manifold_scores(ref, syn, k=3)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(0.5, abs=0.02)
    assert scores["coverage"] == pytest.approx(0.5, abs=0.05)


def test_manifolds_need_more_than_k_points():
    assert all(math.isnan(v) for v in quality.manifold_scores(np.zeros((5, 2)), np.ones((9, 2)), k=5).values())


# --- lesion kept, tone moved, the reference set --------------------------------------------

def grey(value: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


class RightByConstruction(nn.Module):
    """Class c for an image of uniform grey 30 * c (write_study's colours): the nearest of their means."""

    def __init__(self, cfg: config.Config):
        super().__init__()
        means = []
        for c in range(len(LABELS)):
            x = classifiers.eval_view(torch.full((1, 3, 36, 36), 30 * c, dtype=torch.uint8), cfg.classify.crop_size)
            means.append(x.mean().item())
        v = torch.tensor(means)
        self.head = nn.Linear(1, len(LABELS))  # logit_c = 2 v_c m - v_c^2: argmax = nearest mean
        with torch.no_grad():
            self.head.weight.copy_(2 * v[:, None])
            self.head.bias.copy_(-v ** 2)

    def forward(self, x):
        return torch.log_softmax(self.head(x.mean(dim=(1, 2, 3))[:, None]), dim=1)


def uniform_study(root: Path) -> dict:
    """write_study's layout with images of exactly one grey per label (no noise), and one synthetic
    image per source requested at FST 5, the last of them painted another label's grey."""
    paths = write_study(root, per_label_train=3, per_label_test=1)
    train = pd.read_csv(paths["split_dir"] / "train.csv")
    for name in ("train", "test", "flex_light"):
        for _, r in pd.read_csv(paths["split_dir"] / f"{name}.csv").iterrows():
            grey(30 * LABELS.index(r.label)).save(paths["images_dir"] / f"{r.md5hash}.jpg", quality=100)
    manifest = pd.read_csv(paths["syn_dir"] / "manifest.csv")
    for i, r in manifest.iterrows():
        wrong = i == len(manifest) - 1
        grey(30 * ((LABELS.index(r.label) + wrong) % len(LABELS)), 32).save(paths["syn_dir"] / r.file)
    manifest["source_fitzpatrick_scale"] = manifest.source_md5hash.map(dict(zip(train.md5hash, train.fitzpatrick_scale)))
    manifest.to_csv(paths["syn_dir"] / "manifest.csv", index=False)
    return paths


def test_lesion_kept_scores_a_classifier_right_by_construction(tmp_path):
    cfg = small_cfg()
    paths = uniform_study(tmp_path)
    model = RightByConstruction(cfg).eval()
    table, syn_feat, ref, ref_feat = quality.per_image(paths["split_dir"], paths["images_dir"], paths["syn_dir"],
                                                       model, LABELS, cfg, torch.device("cpu"))
    assert list(table.lesion_kept) == [True] * (len(table) - 1) + [False]  # only the repainted one is missed
    assert table.p_label.iloc[:-1].min() > table.p_label.iloc[-1]
    by_label = quality.group_scores(table, syn_feat, ref, ref_feat, ["fitzpatrick_scale", "label"], cfg, 0)
    assert list(by_label.lesion_kept_pct) == [100.0] * (len(LABELS) - 1) + [pytest.approx(100 * 2 / 3)]
    # tone moved: ITA of source and synthetic image, the band of the requested type
    assert table.ita_shift.to_numpy() == pytest.approx((table.ita - table.ita_source).to_numpy())
    assert list(table.in_band) == [tone.in_expected_band(v, 5) for v in table.ita]


def test_the_reference_set_never_holds_a_test_image(tmp_path):
    """Scenario 1: flex_dark is the test set; its images never stand as the reference."""
    split = tmp_path / "split"
    split.mkdir()
    row = lambda m, s: {"md5hash": m.ljust(32, "0"), "label": LABELS[0], "fitzpatrick_scale": s}  # noqa: E731
    pd.DataFrame([row("a", 5), row("b", 6), row("c", 1)]).to_csv(split / "train.csv", index=False)
    pd.DataFrame([row("d", 5), row("e", 6)]).to_csv(split / "test.csv", index=False)
    pd.DataFrame([row("d", 5), row("e", 6)]).to_csv(split / "flex_dark.csv", index=False)
    pd.DataFrame([row("f", 1)]).to_csv(split / "flex_light.csv", index=False)
    rows = quality.reference_rows(split)
    assert sorted(m[0] for m in rows.md5hash) == ["a", "b", "c", "f"]
    assert quality.describe(rows[rows.fitzpatrick_scale == 5]) == "train 1"
    assert quality.describe(rows[rows.fitzpatrick_scale == 3]) == "no reference"
    # scenario 3: no dark training image, the dark flexible subset is neither trained nor tested on
    pd.DataFrame([row("c", 1)]).to_csv(split / "train.csv", index=False)
    pd.DataFrame([row("x", 5)]).to_csv(split / "test.csv", index=False)
    assert quality.describe(quality.reference_rows(split).query("fitzpatrick_scale == 5")) == "flex_dark 1"


# --- DINOv2 from a tiny local model --------------------------------------------------------

def tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    return folder


def test_dinov2_features_from_a_local_model(tmp_path):
    cfg = small_cfg()
    cfg = config.replace(cfg, quality=config.replace(cfg.quality, features="dinov2", dinov2=str(tiny_dinov2(tmp_path / "d")),
                                                     revision=None, image_size=28))
    paths = []
    for i in range(3):
        grey(60 * i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    model = quality.load_dinov2(cfg, torch.device("cpu"))
    feats = quality.dinov2_features(model, paths, cfg, torch.device("cpu"))
    assert feats.shape == (3, 16) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[2])  # different images, different features


@pytest.mark.parametrize("where", ["skinaug-test/absent-dinov2", "missing/local/folder"])
def test_dinov2_offline_or_absent_says_how_to_fix_it(tmp_path, where):
    cfg = small_cfg()  # conftest: HF_HUB_OFFLINE, so the hub id fails as it does without a network
    cfg = config.replace(cfg, quality=config.replace(cfg.quality, dinov2=where))
    with pytest.raises(SkinaugError) as err:
        quality.load_dinov2(cfg, torch.device("cpu"))
    assert "quality.features: classifier" in str(err.value) and "\n" not in str(err.value)


# --- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "ok"), [
    ("select.rules", [], True), ("select.rules", ["tone", "best_n"], True), ("select.rules", ["colour"], False),
    ("select.rules", ["tone", "tone"], False), ("select.best_n", 0, False), ("quality.features", "inception", False),
    ("quality.image_size", 225, False), ("quality.kid_subset_size", 1, False), ("quality.arch", "vgg16", True)])
def test_quality_and_select_settings_are_checked(key, value, ok):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    if ok:
        assert functools_get(config.from_dict(raw), key) == value
    else:
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            config.from_dict(raw)


def test_an_imagenet_vit_reference_needs_its_input_size():
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["backbone"]["source"], raw["quality"]["arch"] = "imagenet", "vit_b_16"  # demo crop_size: 32
    with pytest.raises(config.ConfigError, match="quality.arch"):
        config.from_dict(raw)
    raw["backbone"]["source"] = "world"  # the backbone stage pretrains a ViT at the demo's size
    assert config.from_dict(raw).quality.arch == "vit_b_16"


def functools_get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# --- the whole measure on a tiny study -----------------------------------------------------

@pytest.mark.slow  # trains a reference classifier and draws two figures: ~30 s on 2 busy cores
def test_quality_run_writes_its_tables_figures_and_headline(tmp_path):
    cfg = small_cfg(epochs=1)
    cfg = config.replace(cfg, quality=config.replace(cfg.quality, features="classifier", arch="resnet18",
                                                     nearest_k=2, kid_subsets=5))
    paths = uniform_study(tmp_path)
    ref_pt = tmp_path / "reference.pt"
    info = classifiers.train_reference(paths["split_dir"], paths["images_dir"], ref_pt, "resnet18", cfg, seed=0)
    assert info["n_train"] == 3 * len(LABELS)
    again = tmp_path / "again" / "reference.pt"  # the same work again: the same bytes (DVC compares them)
    classifiers.train_reference(paths["split_dir"], paths["images_dir"], again, "resnet18", cfg, seed=0)
    assert again.read_bytes() == ref_pt.read_bytes()
    out, metrics = tmp_path / "q", tmp_path / "metrics.json"
    head = quality.run(paths["split_dir"], paths["images_dir"], paths["syn_dir"], ref_pt, out, metrics, cfg, 0, "test")
    assert json.loads(metrics.read_text()) == head
    assert set(quality.HEADLINE) <= set(head) and head["n_syn"] == 3 * len(LABELS)
    by_type = pd.read_csv(out / "by_type.csv")
    # requested type 5; reference = real FST 5 training images (write_study: 1 of 3 per label), test excluded
    train = pd.read_csv(paths["split_dir"] / "train.csv")
    assert list(by_type.fitzpatrick_scale.astype(str)) == ["5", "all"]
    assert by_type.n_ref.iloc[0] == (train.fitzpatrick_scale == 5).sum()
    assert by_type.reference.iloc[0] == f"train {(train.fitzpatrick_scale == 5).sum()}"
    by_source = pd.read_csv(out / "by_source_type.csv")
    pairs = list(zip(by_source.source_fitzpatrick_scale, by_source.fitzpatrick_scale))
    assert pairs == [(1, 5), (2, 5), (5, 5)]  # write_study's sources: types 1, 2, 5, all requested at 5
    assert set(by_source.n_ref) == {by_type.n_ref.iloc[0]}  # the requested type's reference, whatever the source
    assert by_source.n_syn.sum() == head["n_syn"]
    assert (out / "grid.png").stat().st_size > 0 and (out / "ita_vs_lesion.png").stat().st_size > 0
    md = (out / "quality.md").read_text()
    assert "Per requested skin type and label" in md and "train " in md
    section = results._quality_section(tmp_path, tmp_path.parent)  # results.md's quality section
    assert f"]({tmp_path.name}/q/grid.png)" in section and "## Synthetic-image quality" in section

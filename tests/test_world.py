"""The embedded demo world (skinaug.demo.world): Table 1's counts, determinism, skin and lesions, the web corpus."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinaug import SkinaugError, config, prompts, tone
from skinaug.data import fitzpatrick
from skinaug.demo import world

from test_fitzpatrick import _check_table1_counts


def test_world_has_table1_counts_and_images(world_dir, repo_cfg):
    meta = pd.read_csv(world_dir / "metadata.csv", dtype={"md5hash": str})
    assert list(meta.columns) == fitzpatrick.COLUMNS
    _check_table1_counts(meta)
    assert meta["md5hash"].is_unique
    assert set(meta["fitzpatrick_centaur"]) <= {-1, 1, 2, 3, 4, 5, 6}
    assert meta["url"].str.startswith("https://example.invalid/world/").all()
    files = sorted(p.stem for p in (world_dir / "images").glob("*.jpg"))
    assert files == sorted(meta["md5hash"])
    with Image.open(world_dir / "images" / f"{meta.md5hash[0]}.jpg") as img:
        assert img.format == "JPEG" and img.size == (repo_cfg.world.image_size,) * 2
    # The subset stage keeps every world row.
    assert len(fitzpatrick.study_subset(fitzpatrick.load_metadata(world_dir / "metadata.csv", None), repo_cfg.subset)) == 1631


def test_world_is_deterministic(tmp_path, repo_cfg):
    small = config.replace(repo_cfg.subset, labels=["nematode infection", "prurigo nodularis"])
    a = world.make_world(repo_cfg.world, small, tmp_path / "a")
    b = world.make_world(repo_cfg.world, small, tmp_path / "b")
    c = world.make_world(config.replace(repo_cfg.world, seed=1), small, tmp_path / "c")
    assert len(a) == 115 + 73
    pd.testing.assert_frame_equal(a, b)
    for md5 in a["md5hash"]:
        assert (tmp_path / "a/images" / f"{md5}.jpg").read_bytes() == (tmp_path / "b/images" / f"{md5}.jpg").read_bytes()
    assert not set(a["md5hash"]) & set(c["md5hash"])
    assert a["md5hash"][0] == hashlib.md5(b"world-0-0").hexdigest()


def test_world_refuses_unknown_label(tmp_path, repo_cfg):
    with pytest.raises(SkinaugError, match="no pattern for acne"):
        world.make_world(repo_cfg.world, config.replace(repo_cfg.subset, labels=["acne"]), tmp_path)


def test_skin_darkens_with_type_and_every_lesion_shows_on_every_tone():
    rng = np.random.default_rng(0)
    fst = np.repeat(np.arange(1, 7), 20)
    skin = world.draw_skin(fst, rng, 64)
    brightness = [skin[fst == f].mean() for f in range(1, 7)]
    assert all(a > b for a, b in zip(brightness, brightness[1:])), brightness
    for label in world.LESIONS:
        painted, height = world.draw_lesion(label, skin, fst, rng)
        # Visible: the lesion's most changed pixels (99th percentile) differ from the skin by > 8 %.
        change = np.abs(painted - skin).sum(-1) / skin.sum(-1)
        strongest = np.percentile(change.reshape(len(fst), -1), 99, axis=1)
        for f in range(1, 7):
            assert np.median(strongest[fst == f]) > 0.08, (label, f, np.median(strongest[fst == f]))
        assert height.shape == skin.shape[:3]
    photos = world.render("psoriasis", [1, 6], rng, 32)
    assert photos.shape == (2, 32, 32, 3) and photos.dtype == np.uint8


def test_classifier_trained_on_light_skin_loses_accuracy_on_dark(world_dir):
    """The point of the world: light-only training transfers badly to dark skin (~0.75 vs ~0.2 accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    meta = pd.read_csv(world_dir / "metadata.csv", dtype={"md5hash": str})
    x = np.stack([np.asarray(Image.open(world_dir / "images" / f"{m}.jpg").resize((16, 16), Image.BILINEAR),
                             np.float32).ravel() / 255 for m in meta["md5hash"]])
    y = meta["label"].to_numpy()
    light = meta["fitzpatrick_scale"].isin([1, 2]).to_numpy()
    held = np.random.default_rng(0).random(len(meta)) < 0.5

    def accuracy(train, test):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs may stop before full convergence; irrelevant here
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=200)).fit(x[train], y[train])
        return (model.predict(x[test]) == y[test]).mean()

    on_light = accuracy(light & ~held, light & held)
    on_dark = accuracy(light & ~held, ~light & held)
    with_dark = accuracy(~held, ~light & held)
    assert on_light > 0.6, on_light
    assert on_dark < on_light - 0.3, (on_light, on_dark)
    assert with_dark > on_dark + 0.1, (on_dark, with_dark)  # dark skin is learnable, just not from light skin


def test_web_corpus_covers_every_tone_with_the_prompts_wording():
    pixels, fsts, captions = world.web_corpus(120, seed=0, size=32)
    assert pixels.shape == (120, 32, 32, 3) and set(fsts) == {1, 2, 3, 4, 5, 6}
    for fst, caption in zip(fsts, captions):
        assert caption.endswith(f"on the skin of {prompts.TONES[int(fst)]} individual")
        assert not any(label in caption for label in prompts.TOKENS)  # generic marks, never a study condition
    medians = [np.median([tone.skin_ita(p) for p in pixels[fsts == f]]) for f in range(1, 7)]
    assert all(a > b for a, b in zip(medians, medians[1:]))  # lighter types have the higher ITA

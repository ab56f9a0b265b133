"""ITA: the formula on known colours, and a skin estimate that ignores the lesion."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.color import lab2rgb

from skinaug import tone


def _patch(lightness, a_star, b_star, size=24):
    rgb = lab2rgb(np.full((size, size, 3), [lightness, a_star, b_star], dtype=float))
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("lightness,a_star,b_star", [(70, 10, 15), (40, 12, 20), (25, 8, 10), (62, 6, 18)])
def test_ita_of_uniform_patches_matches_the_formula(lightness, a_star, b_star):
    expected = np.degrees(np.arctan((lightness - 50) / b_star))
    assert tone.skin_ita(_patch(lightness, a_star, b_star)) == pytest.approx(expected, abs=1.0)


def test_ita_formula_on_arrays_and_grey():
    assert tone.ita(50, 10) == pytest.approx(0.0)
    assert tone.ita(60, 10) == pytest.approx(45.0)
    assert tone.ita(70, 0) == pytest.approx(90.0)


def test_estimator_ignores_a_dark_lesion_on_light_skin():
    skin = _patch(72, 8, 16, size=40)
    with_lesion = skin.copy()
    with_lesion[12:28, 12:28] = _patch(22, 20, 10, size=16)  # 16% of the image, very dark
    expected = tone.skin_ita(skin)
    assert tone.skin_ita(with_lesion) == pytest.approx(expected, abs=1.5)
    lab = tone.rgb_to_lab(with_lesion)
    naive = tone.ita(lab[..., 0].mean(), lab[..., 2].mean())
    assert naive < expected - 5  # a plain mean over all pixels is pulled down by the lesion


def test_tone_classes_and_bands():
    assert tone.ita_class(60) == "very light" and tone.ita_class(-40) == "dark"
    assert tone.in_expected_band(-45, 6) and not tone.in_expected_band(50, 6)
    assert [tone.in_dark_range(v) for v in (-90, -45, 0, 10, 11, 50)] == [True, True, True, True, False, False]


def test_report_keeps_synthetic_images_of_light_and_dark_sources_apart(tmp_path):
    """Dark sources keep their own type, so they would flatter the check if pooled with the darkened light ones."""
    import pandas as pd

    images, syn = tmp_path / "images", tmp_path / "syn"
    images.mkdir(), syn.mkdir()
    real = [("a" * 32, 1, (72, 5, 16)), ("b" * 32, 6, (30, 8, 14))]
    for md5hash, _, lab in real:
        Image.fromarray(_patch(*lab)).save(images / f"{md5hash}.jpg")
    for split in ("train", "test"):
        pd.DataFrame([(m, "psoriasis", f) for m, f, _ in real],
                     columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(tmp_path / f"{split}.csv", index=False)
    made = [("x.png", "a" * 32, 1, 6, (28, 8, 14)), ("y.png", "b" * 32, 6, 6, (29, 8, 14))]
    for file, _, _, _, lab in made:
        Image.fromarray(_patch(*lab)).save(syn / file)
    pd.DataFrame([m[:4] for m in made], columns=["file", "source_md5hash", "source_fitzpatrick_scale",
                                                 "fitzpatrick_scale"]).assign(label="psoriasis").to_csv(
        syn / "manifest.csv", index=False)
    summary = tone.write_tone_report(tmp_path, images, syn, tmp_path / "out", light=[1, 2])
    rows = summary.set_index("group")
    assert set(rows.index) == set(tone.GROUPS)
    assert rows.loc["synthetic from light", "n"] == 1 and rows.loc["synthetic from light", "ita_median"] < -30
    assert (tmp_path / "out" / "tone.png").stat().st_size > 0
    with Image.open(tmp_path / "out" / "tone.png") as im:  # shown 1:1 in a markdown page (about 880 px wide)
        assert im.size[0] <= 880

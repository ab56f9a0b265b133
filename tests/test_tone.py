"""ITA: the formula on known colours, and a skin estimate that ignores the lesion."""
from __future__ import annotations

import numpy as np
import pytest
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

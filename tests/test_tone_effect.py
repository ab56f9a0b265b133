"""End to end on a reduced demo: the method moves skin tone the way the prompts ask (slow).

The demo profile's own pretrained base, at one thread (pretrained beside the other tests, which
pytest runs first, and kept in pytest's cache for the next run of unchanged code: demobase.py),
then Textual Inversion and LoRA on scenario 1's light training images of two labels, then img2img
of those images towards FST 5 and 6, as the demo runs them (fewer steps and images). A broken
pipeline loses the effect: the same adapters with the tone words swapped in the prompts (a dark
target asked for as very light) must leave the synthetic skin lighter than the sources, not darker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from demobase import result as pretrained_base

from skinaug import config, prompts, tone
from skinaug.data import fitzpatrick, splits
from skinaug.diffusion import finetune
from skinaug.diffusion import generate as G

pytestmark = pytest.mark.slow

LABELS = ["folliculitis", "psoriasis"]
SOURCES_PER_LABEL = 12


@pytest.fixture(scope="module")
def demo_base(request) -> Path:
    """The demo profile's pretrained base at one thread, made by the `base` stage's command beside the
    other tests (demobase.py) and kept in pytest's cache for the next run of unchanged code."""
    return pretrained_base(request.config)


@pytest.fixture(scope="module")
def run(repo_cfg, world_dir, demo_base, tmp_path_factory) -> dict:
    """ITA of the light sources, of their synthetic versions, and of those made with swapped tone words."""
    r = config.replace
    cfg = r(repo_cfg, subset=r(repo_cfg.subset, labels=LABELS),
            textual_inversion=r(repo_cfg.textual_inversion, steps=40),
            lora=r(repo_cfg.lora, steps=40))
    root = tmp_path_factory.mktemp("tone_effect")
    subset = root / "subset.csv"
    fitzpatrick.read_table(world_dir / "metadata.csv").pipe(fitzpatrick.study_subset, cfg.subset).to_csv(subset, index=False)
    split = root / "split"
    splits.write_splits(subset, split, 1, 0, cfg.splits, None, None)
    images = world_dir / "images"
    base = demo_base
    finetune.train_textual_inversion(split / "train.csv", images, base, root / "ti", cfg, 0)
    finetune.train_lora(split / "train.csv", images, base, root / "ti", root / "lora", cfg, 0)

    def synthesize(out):
        G.generate(split / "train.csv", images, base, out, cfg, 0, ti_dir=root / "ti", lora_dir=root / "lora",
                   strategy="img2img_ti_lora", sources_per_label=SOURCES_PER_LABEL)
        manifest = fitzpatrick.read_table(out / "manifest.csv")
        manifest = manifest[manifest.source_fitzpatrick_scale <= 2].reset_index(drop=True)  # light made dark
        return manifest, tone.measure([out / f for f in manifest.file])

    manifest, right = synthesize(root / "syn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prompts, "TONES", {k: prompts.TONES[7 - k] for k in prompts.TONES})
        swapped_manifest, swapped = synthesize(root / "syn_swapped")
    assert "very light-skinned" in swapped_manifest.prompt[swapped_manifest.fitzpatrick_scale == 6].iloc[0]
    sources = tone.measure([images / f"{m}.jpg" for m in manifest.source_md5hash])
    return {"manifest": manifest, "sources": sources, "right": right, "swapped": swapped}


def test_the_method_darkens_light_skin_into_the_dark_types_range(run):
    """Light sources asked for FST 5 or 6 come out dark: the median 30 degrees of ITA darker than the
    sources, and at least half of the images in the dark types' range (FST 5's and 6's bands
    together, ITA -90 to +10).

    Which of the two dark types an image reaches is not asserted: the tiny base's pretraining
    decides it, and rounding tips it (README, "FST 5 is not reached everywhere"). Eight bases probed
    with img2img alone (benchmarks/base_tones.py: seeds 0 and 1, noise offsets 5, 8 and 12, a cosine
    learning rate, one and two threads; 2026-11-29) put the FST 5 requests' median ITA anywhere from
    +36 to -40 degrees and the FST 6 ones' from -2 to -73 (their bands: -60 to +10, -90 to -30), yet
    every time 60-100 % of the images in the dark range, against sources at +55. The demo's own recipe
    at seed 1 (2026-11-30) put 1 % there: this holds for the demo's base seed (model.seed 0), not for
    any seed."""
    manifest: pd.DataFrame = run["manifest"]
    assert len(manifest) >= 8 and set(manifest.fitzpatrick_scale) == {5, 6}
    assert np.median(run["right"]) < np.median(run["sources"]) - 30
    in_dark_range = [tone.in_dark_range(v) for v in run["right"]]
    assert np.mean(in_dark_range) >= 0.5, f"ITA {np.round(run['right'])} for types {manifest.fitzpatrick_scale.tolist()}"


def test_swapped_tone_words_move_the_tone_the_wrong_way(run):
    assert np.median(run["swapped"]) > np.median(run["sources"]) - 15  # not darkened
    assert np.median(run["swapped"]) > np.median(run["right"]) + 40

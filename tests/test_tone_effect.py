"""End to end on a reduced demo: the method moves skin tone the way the prompts ask (slow).

The demo profile's own pretrained base (12.5 minutes at two threads on 2 CPU cores, 2026-11-29;
kept in pytest's cache for the next run of unchanged code, see demo_base), then Textual Inversion
and LoRA on scenario 1's light training images of two labels, then img2img of those images
towards FST 5 and 6, as the demo runs them (fewer steps and images). A broken pipeline loses the
effect: the same adapters with the tone words swapped in the prompts (a dark target asked for as
very light) must leave the synthetic skin lighter than the sources, not darker.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinaug import config, hashing, prompts, tone
from skinaug.data import fitzpatrick, splits
from skinaug.diffusion import base as diffusion_base
from skinaug.diffusion import finetune
from skinaug.diffusion import generate as G
from skinaug.diffusion import sd21

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["folliculitis", "psoriasis"]
SOURCES_PER_LABEL = 12


@pytest.fixture(scope="module")
def demo_base(repo_cfg, request, tmp_path_factory) -> Path:
    """The demo profile's pretrained base, made as the `base` stage makes it, in pytest's cache.

    Its key is every source file of skinaug, the model params and the torch version, so a
    change to any of them pretrains afresh; a clean clone (CI) always does. `pytest
    --cache-clear` empties the cache, `-p no:cacheprovider` bypasses it. Older keys are deleted:
    one base is kept (7 MB)."""
    if not request.config.pluginmanager.hasplugin("cacheprovider"):
        return diffusion_base.prepare_base(repo_cfg.model, tmp_path_factory.mktemp("base") / "base")
    sources = sorted((ROOT / "src" / "skinaug").rglob("*.py"))
    made_of = [hashing.files_digest(sources, ROOT), dataclasses.asdict(repo_cfg.model), torch.__version__]
    key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]
    cache = request.config.cache.mkdir("skinaug-demo-base")
    for old in cache.iterdir():
        if key not in old.name:  # another key's base, or its lock or leftover .tmp
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if not (cache / key / sd21.BASE_INFO).is_file():  # written last, before the folder is renamed into place
        diffusion_base.prepare_base(repo_cfg.model, cache / key)  # the demo's pretraining, as in `dvc repro`
    return cache / key


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
    every time 60-100 % of the images in the dark range, against sources at +55."""
    manifest: pd.DataFrame = run["manifest"]
    assert len(manifest) >= 8 and set(manifest.fitzpatrick_scale) == {5, 6}
    assert np.median(run["right"]) < np.median(run["sources"]) - 30
    in_dark_range = [tone.in_dark_range(v) for v in run["right"]]
    assert np.mean(in_dark_range) >= 0.5, f"ITA {np.round(run['right'])} for types {manifest.fitzpatrick_scale.tolist()}"


def test_swapped_tone_words_move_the_tone_the_wrong_way(run):
    assert np.median(run["swapped"]) > np.median(run["sources"]) - 15  # not darkened
    assert np.median(run["swapped"]) > np.median(run["right"]) + 40

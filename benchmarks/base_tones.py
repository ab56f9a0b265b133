"""How a demo base answers the dark tone words under img2img alone, and what it keeps of the lesion.

    .venv/bin/python benchmarks/base_tones.py --workspace . models/base other/base ...

For each base folder: light world images (FST 1-2) of the study's labels, img2img at the profile's
strength, guidance and steps towards FST 5 and FST 6 with the plain label in the paper's sentence
(no token, no LoRA: the base alone), then per requested type the median skin ITA, the share in
that type's band, and the share whose lesion the workspace's reference classifier (scenario 1,
seed 0) still names; and the share of all images in the dark types' range (ITA -90 to +10).
The workspace is a finished `make demo` (its params.yaml, world and reference classifier); the
same workspace for every base, so that only the base differs. One thread, seeded: about a minute
a base on a 2-core CPU. Made to compare pretraining variants of the tiny base (README, "FST 5 is
not reached everywhere"); the figures quoted there come from it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from skinaug import config, prompts, tone
from skinaug.classify import classifiers, quality
from skinaug.data import fitzpatrick, trainset
from skinaug.diffusion import generate, strategies

DARK_TYPES = (5, 6)
BASE_ALONE = strategies.STRATEGIES["img2img_vanilla"]  # no token, no LoRA


def img2img(pipe, light: pd.DataFrame, images_dir: Path, fst: int, cfg: config.Config) -> list:
    """The study's own call (generate.synthesize) on a base's pipeline, one seed per source, towards `fst`."""
    rows = [{"prompt": prompts.skin_prompt(label, fst, use_tokens=False), "seed": i, "source_md5hash": h}
            for i, (label, h) in enumerate(zip(light.label, light.md5hash))]
    size = generate.batch_size(cfg, torch.device("cpu"), torch.float32)
    return [image for start in range(0, len(rows), size)
            for image in generate.synthesize(pipe, BASE_ALONE, rows[start:start + size], images_dir, cfg)]


def lesion_kept(model, images: list, truth: np.ndarray, cfg: config.Config) -> float:
    with tempfile.TemporaryDirectory() as folder:
        paths = [f"{folder}/{i}.png" for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
        _, logp = quality.classifier_pass(model, paths, cfg, torch.device("cpu"))
    return float(np.mean(logp.argmax(1) == truth))


@click.command()
@click.argument("bases", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workspace", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a finished `make demo` workspace: params, world images, reference classifier")
@click.option("--n", default=96, show_default=True, help="light sources")
@click.option("--seed", default=1, show_default=True, help="draw of the sources")
def main(bases: tuple[Path, ...], workspace: Path, n: int, seed: int) -> None:
    torch.set_num_threads(1)
    cfg = config.load(workspace / "params.yaml")
    model, labels = classifiers.load_reference(workspace / "models/scenario1/seed0/reference.pt", cfg,
                                               torch.device("cpu"),
                                               workspace / f"models/backbone/{cfg.quality.arch}.pt")
    world = fitzpatrick.read_table(workspace / cfg.data.metadata)
    light = world[(world.fitzpatrick_scale <= 2) & world.label.isin(labels)].sample(n, random_state=seed)
    images_dir = workspace / cfg.data.images_dir
    sources = [trainset.open_image(images_dir / f"{h}.jpg", cfg.model.resolution) for h in light.md5hash]
    truth = np.array([labels.index(label) for label in light.label])
    source_ita = np.median([tone.skin_ita(np.asarray(s)) for s in sources])
    print(f"{n} light sources: median ITA {source_ita:+.1f}, reference classifier right on "
          f"{100 * lesion_kept(model, sources, truth, cfg):.0f} %")
    rows = []
    for base in bases:
        row, dark = {"base": str(base)}, []
        pipe = generate.load_pipeline(base, BASE_ALONE, {}, {}, cfg, torch.device("cpu"))  # once per base
        for fst in DARK_TYPES:
            images = img2img(pipe, light, images_dir, fst, cfg)
            ita = np.array([tone.skin_ita(np.asarray(image)) for image in images])
            row[f"FST {fst} ITA"] = round(float(np.median(ita)), 1)
            row[f"FST {fst} in band %"] = round(100 * np.mean([tone.in_expected_band(v, fst) for v in ita]))
            row[f"FST {fst} lesion kept %"] = round(100 * lesion_kept(model, images, truth, cfg))
            dark += [tone.in_dark_range(v) for v in ita]
        row["dark range %"] = round(100 * np.mean(dark))
        rows.append(row)
        print(f"{base}: dark range {row['dark range %']} %", flush=True)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"base_tones: {len(bases)} base(s), {n} sources each, towards FST {DARK_TYPES}")


if __name__ == "__main__":
    main()

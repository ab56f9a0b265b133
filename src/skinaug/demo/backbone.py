"""The demo's ImageNet: classifier backbones pretrained on the demo world's web corpus.

    skinaug backbone models/backbone   # paper: nothing to train; demo: ~4 min on 2 CPU cores

The web corpus is photos of generic marks (moles, rashes, scars, freckles, bruises, lesions) on
every skin type, the same the tiny diffusion model is pretrained on; each architecture learns to
tell the marks apart, as ImageNet models learn objects. None of the study's images or labels is
seen. The classifiers then follow the paper's protocol: this backbone frozen, the reference head
trained (SPEC §5). From-scratch training at the demo's sizes did not, and its accuracies moved by
up to 16 points between one and two CPU threads (README "One thread or two").
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pandas as pd
import torch

from skinaug import atomic, hashing, resume
from skinaug.classify import classifiers
from skinaug.classify.backbone import needed_archs, trains
from skinaug.config import Config
from skinaug.demo import world

MARKS = sorted(world.GENERIC_MARKS)  # the pretraining classes, in this order


def write(out_dir: Path, cfg: Config) -> list[str]:
    """Write out_dir/{arch}.json for every needed architecture, and with backbone.source world its
    pretrained out_dir/{arch}.pt; return the architectures.

    The record (what the classifier stages depend on) says where the weights come from; for a
    pretrained file it holds how it was made and its sha256. Files of architectures no longer
    needed are removed; a finished file made the same way is kept, so adding an architecture
    trains only its own. An interrupted run continues from the last checkpoint (classifiers.fit).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = needed_archs(cfg)
    for stale in [*out_dir.glob("*.pt"), *out_dir.glob("*.json")]:
        if stale.stem not in archs or stale.suffix == ".pt" and not trains(cfg):
            stale.unlink()
    for arch in archs:
        if trains(cfg):
            pretrain(arch, cfg, out_dir / f"{arch}.pt")
        else:
            atomic.write_json(out_dir / f"{arch}.json",
                              {"arch": arch, "source": cfg.backbone.source if cfg.classify.pretrained else None})
    return archs


def pretrain(arch: str, cfg: Config, out_path: Path) -> None:
    """Train `arch` from scratch to tell the web corpus's marks apart; save all but its head.

    The classifiers' own training loop and augmentation (classifiers.fit, classify.image_size,
    crop_size, batch_size and lr_step) with backbone.epochs and backbone.lr, every weight trained.
    Its record (out_path with .json, written last) holds the recipe and the file's sha256; a
    finished file whose record names the same recipe is kept.
    """
    ccfg = dataclasses.replace(cfg.classify, epochs=cfg.backbone.epochs, lr=cfg.backbone.lr,
                               selection="last", freeze_backbone=False)
    recipe = json.loads(json.dumps({"arch": arch, "source": "world", "backbone": dataclasses.asdict(cfg.backbone),
                                    "classify": dataclasses.asdict(ccfg), "marks": MARKS,
                                    "torch": torch.__version__}))
    record = out_path.with_suffix(".json")
    made = atomic.read_json(record) or {}
    if out_path.is_file() and made.get("recipe") == recipe and made.get("sha256") == hashing.file_digest(out_path):
        print(f"{out_path} is already made this way; kept", flush=True)
        return
    record.unlink(missing_ok=True)
    corpus = web_set(cfg)
    with resume.Work(out_path, recipe) as work:
        torch.manual_seed(cfg.backbone.seed)
        model = classifiers.build_classifier(arch, len(MARKS), False, False, ccfg.crop_size)
        classifiers.fit(model, corpus, None, {}, dataclasses.replace(cfg, classify=ccfg), cfg.backbone.seed,
                        desc=f"backbone {arch}", work=work)
        head = classifiers.ARCHITECTURES[arch].head + "."
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        # Saved through memory, as train_reference does: the bytes then do not depend on a temp name.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic.write_bytes(out_path, buffer.getvalue())
        atomic.write_json(record, {"recipe": recipe, "sha256": hashing.file_digest(out_path)})
        work.discard()


def web_set(cfg: Config) -> classifiers.ImageSet:
    """The demo world's web corpus at classify.image_size, each photo's class its mark (MARKS)."""
    b = cfg.backbone
    pixels, fsts, captions = world.web_corpus(b.corpus, b.seed, cfg.classify.image_size)
    names = [next(m for m in MARKS if m in caption.split()) for caption in captions]
    targets = torch.tensor([MARKS.index(name) for name in names])
    table = pd.DataFrame({"label": names, "fitzpatrick_scale": fsts})
    return classifiers.ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), targets, table)

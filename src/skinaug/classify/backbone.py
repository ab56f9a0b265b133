"""Which backbone weights a classifier starts from: the backbone stage's folder, one file per architecture.

The paper's classifiers start from torchvision's ImageNet weights, frozen, with a new head
(SPEC §5): with backbone.source imagenet (the paper profile) the backbone stage's folder holds a
record per architecture, {arch}.json, and the classifiers load those weights through torchvision.
ImageNet cannot be downloaded offline, so the demo (backbone.source world) pretrains its own
backbones on the demo world's web corpus (skinaug.demo.backbone), {arch}.pt beside the record,
and the classifiers load them from there. Each classifier stage depends on its arch's record.
"""
from __future__ import annotations

from pathlib import Path

from skinaug import SkinaugError
from skinaug.config import Config


def needed_archs(cfg: Config) -> list[str]:
    """Every architecture a stage builds: the study's, the ablation's and the reference classifier's."""
    return sorted({*cfg.classify.archs, cfg.ablation.arch, cfg.quality.arch})


def trains(cfg: Config) -> bool:
    """Whether the backbone stage pretrains backbones (else classify.pretrained means ImageNet, or nothing)."""
    return cfg.classify.pretrained and cfg.backbone.source == "world"


def weights_file(cfg: Config, backbone_dir: Path | None, arch: str) -> Path | None:
    """The backbone file a classifier of `arch` starts from; None: torchvision's ImageNet weights or none."""
    if not trains(cfg):
        return None
    if backbone_dir is None:
        raise SkinaugError("backbone.source is world: pass --backbone DIR, the backbone stage's folder")
    path = Path(backbone_dir) / f"{arch}.pt"
    if not path.is_file():
        raise SkinaugError(f"{path} not found: run the backbone stage first (`dvc repro backbone`)")
    return path

"""Typed settings: frozen dataclasses mirroring params.yaml, read in this one place.

params.yaml is composed by DVC's Hydra integration from conf/ (a `profile` group
holding `demo` and `paper`), so it always holds the values actually used.
Unknown keys, missing keys and wrong types fail with one clear line.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from skinaug import SkinaugError

SCENARIOS = (1, 2, 3)

# The allowed names, one home. classify, generate and prompts key their tables by these and
# assert at import that the keys match; kept here because config must stay light (no torch).
ARCHS = ("vgg16", "resnet18", "vit_b_16")  # torchvision classifiers (classify._WEIGHTS)
STRATEGIES = ("img2img_ti_lora", "img2img_ti", "img2img_lora", "img2img_vanilla",  # generate.STRATEGIES
              "txt2img_ti", "txt2img_vanilla")
SELECTIONS = ("last", "val", "test_reference")  # model selection rules (classify.SELECTION_LABELS)
TI_TEMPLATES = ("authors", "imagenet")  # textual-inversion template sets (prompts.TI_TEMPLATES)
SAMPLINGS = ("pooled", "per_type")  # flexible-subset draws (splits.flexible_subsets)
DEVICES = ("auto", "cpu", "cuda")  # diffusion.pick_device; cuda:N is not offered: Accelerate picks its own GPU


class ConfigError(SkinaugError):
    """A params.yaml problem, worded for the person who has to fix it."""


@dataclass(frozen=True)
class DataConfig:
    source: str  # "world" (the embedded demo world) or "fitzpatrick17k" (the real metadata)
    metadata: str  # metadata CSV the study subset is drawn from (a dvc.yaml dependency)
    metadata_md5: str | None  # checksum verified before use; null skips it (the demo world)
    images_dir: str | None  # local folder of {md5hash}.jpg; null downloads the `url` column
    allow_missing: bool  # drop rows whose image cannot be had, instead of stopping


@dataclass(frozen=True)
class WorldConfig:
    seed: int  # seed of the embedded demo world (metadata and images)
    image_size: int  # side of the demo images in pixels


@dataclass(frozen=True)
class DownloadConfig:
    workers: int  # concurrent downloads
    timeout_s: float  # per-request timeout
    retries: int  # attempts after the first, with exponential back-off
    backoff_s: float  # first back-off delay; doubles each retry


@dataclass(frozen=True)
class SubsetConfig:
    labels: list[str]  # the study's conditions, in the dataset's own wording
    fitzpatrick_scales: list[int]  # skin types kept (paper: 1, 2, 5, 6)


@dataclass(frozen=True)
class SplitsConfig:
    seeds: list[int]  # one flexible subset and one study repeat per seed
    sampling: str  # "pooled" (authors' released notebook) or "per_type" (paper runs)
    per_label: int  # flexible images per label, per light/dark group
    light: list[int]  # fitzpatrick_scale values counted as light skin
    dark: list[int]  # fitzpatrick_scale values counted as dark skin
    dedupe: bool  # keep near-duplicate images of one lesion on one side of the split


@dataclass(frozen=True)
class ModelConfig:
    base: str  # hub id or local diffusers folder of the base Stable Diffusion model
    revision: str | None  # pinned hub revision (commit hash); null = default branch
    resolution: int  # training and generation resolution in pixels
    mixed_precision: str  # "no", "fp16" or "bf16"; CPU always runs fp32
    device: str  # "auto", "cpu" or "cuda"
    channels_last: bool  # UNet and VAE in channels_last memory format on GPU (speed only; same results)
    seed: int  # seed of the tiny demo model (model.base: tiny)
    tiny_corpus: int  # tiny model: images in the demo world's web corpus it is pretrained on
    tiny_vae_steps: int  # tiny model: autoencoder pretraining steps (0: random weights)
    tiny_unet_steps: int  # tiny model: UNet + text encoder pretraining steps (0: random weights)


@dataclass(frozen=True)
class TextualInversionConfig:
    init_token: str  # existing token whose embedding initialises every new token
    steps: int  # optimiser updates per token
    batch_size: int  # images per token per forward pass
    grad_accum: int  # forward passes per update
    lr: float  # base learning rate (scaled by batch_size * grad_accum when scale_lr)
    scale_lr: bool  # multiply lr by the effective batch, as the reference does
    weight_decay: float  # AdamW weight decay
    flip_p: float  # probability of a horizontal flip
    checkpoint_every: int  # optimiser updates between resumable checkpoints; 0 = never
    tokens_per_pass: int  # tokens per forward pass, 0 = all; fewer uses less GPU memory, same result
    templates: str  # "authors" (their 11 neutral templates) or "imagenet" (diffusers' 27, with "a dark photo of")


@dataclass(frozen=True)
class LoraConfig:
    rank: int  # LoRA rank r
    alpha: int  # LoRA alpha (scale = alpha / rank)
    targets: list[str]  # UNet attention modules adapted
    steps: int  # optimiser updates (per LoRA in per_label mode)
    batch_size: int  # images per update
    lr: float  # constant learning rate
    max_grad_norm: float  # gradient-norm clip; 0 = none (the reference's clip is a no-op, see README deviations)
    weight_decay: float  # AdamW weight decay (the reference script's default)
    checkpoint_every: int  # optimiser updates between resumable checkpoints; 0 = never
    mode: str  # "joint" (one LoRA, released code) or "per_label" (paper runs)
    use_tokens: bool  # prompts name the learned tokens (false: plain condition names)


@dataclass(frozen=True)
class GenerateConfig:
    per_source: int  # synthetic images per training image
    strength: float  # img2img strength
    steps: int  # scheduler steps (img2img runs about strength * steps of them)
    guidance: float  # classifier-free guidance scale
    out_size: int  # saved image side in pixels
    batch_size: int  # synthetic images per pipeline call; 0 = from free GPU memory
    strategy: str  # "img2img_ti_lora" (the method) or an ablation strategy
    target_per: str  # a light source's target skin type drawn once per "source" (the authors) or per "image"
    compile: bool  # torch.compile the UNet (slow first batch; same results)


@dataclass(frozen=True)
class ClassifyConfig:
    archs: list[str]  # torchvision architectures trained
    pretrained: bool  # ImageNet weights (paper) or random init (demo)
    freeze_backbone: bool  # train only the head, as the reference does
    epochs: int  # training epochs
    batch_size: int  # images per step
    lr: float  # Adam learning rate
    selection: str  # "last", "val" or "test_reference" (reference rule, leaks the test set)
    val_fraction: float  # share of training sources held out when selection is "val"
    image_size: int  # resize side before the crop
    crop_size: int  # network input side


@dataclass(frozen=True)
class AblationConfig:
    strategies: list[str]  # generation strategies compared (SPEC §6)
    arch: str  # classifier trained on each strategy's synthetic images
    seeds: list[int]  # one scenario 1 split, adapters and classifier per seed; Table 5 is their mean ± std
    sources_per_label: int  # training images per label the ablation generates from; 0 = all


@dataclass(frozen=True)
class ReportConfig:
    seed: int  # the study seed whose images the tone check and the report's figures show


@dataclass(frozen=True)
class Config:
    profile: str  # "demo" (embedded data, tiny model, CPU) or "paper" (the SPEC's settings)
    scenario: int  # 1, 2 or 3 (SPEC §2)
    data: DataConfig
    world: WorldConfig
    download: DownloadConfig
    subset: SubsetConfig
    splits: SplitsConfig
    model: ModelConfig
    textual_inversion: TextualInversionConfig
    lora: LoraConfig
    generate: GenerateConfig
    classify: ClassifyConfig
    ablation: AblationConfig
    report: ReportConfig


def load(path: str | Path = "params.yaml") -> Config:
    """Read and check params.yaml (the one place it is read)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the repository root, or compose it with `dvc exp run`")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    return from_dict(raw, source=str(path))


def compose(profile: str, overrides: list[str] | None = None, conf_dir: str | Path | None = None) -> Config:
    """The settings of a profile composed from conf/ as `dvc exp run -S profile=...` would, without params.yaml.

    conf/ is looked for beside the working directory, then beside the source tree.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    roots = [Path(conf_dir)] if conf_dir else [Path.cwd() / "conf", Path(__file__).resolve().parents[2] / "conf"]
    for conf in roots:
        if (conf / "config.yaml").is_file() and (conf / "profile" / f"{profile}.yaml").is_file():
            with initialize_config_dir(config_dir=str(conf.resolve()), version_base=None):
                raw = hydra_compose("config", overrides=[f"profile={profile}", *(overrides or [])])
            return from_dict(OmegaConf.to_container(raw, resolve=True), source=f"{conf} (profile {profile})")
    raise ConfigError(f"no conf/profile/{profile}.yaml found: run from the repository root")


def from_dict(raw: dict, source: str = "params") -> Config:
    cfg = _build(Config, raw, source)
    _check(cfg, source)
    return cfg


def replace(cfg, **changes):
    """dataclasses.replace, re-exported so tests can shrink the real config."""
    return dataclasses.replace(cfg, **changes)


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = sorted(set(fields) - set(raw))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**{name: _coerce(hints[name], raw[name], f"{where}: {name}") for name in fields})


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        hintname = getattr(hint, "__name__", str(hint))
        extra = " (write floats like 1.0e-4: YAML reads 1e-4 as text)" if hint is float else ""
        raise ConfigError(f"{where} must be {hintname}, got {value!r}{extra}")
    return value


_CHOICES = {
    "data.source": ("world", "fitzpatrick17k"),
    "splits.sampling": SAMPLINGS,
    "model.mixed_precision": ("no", "fp16", "bf16"),
    "model.device": DEVICES,
    "lora.mode": ("joint", "per_label"),
    "classify.selection": SELECTIONS,
    "textual_inversion.templates": TI_TEMPLATES,
    "generate.target_per": ("source", "image"),
    "generate.strategy": STRATEGIES,
    "ablation.arch": ARCHS,
}


def _check(cfg: Config, source: str) -> None:
    check_scenario(cfg.scenario)
    for dotted, allowed in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {dotted} is {value!r}; choose one of {', '.join(allowed)}")


def check_scenario(scenario: int) -> int:
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario {scenario!r} does not exist; choose 1, 2 or 3 (SPEC §2)")
    return scenario

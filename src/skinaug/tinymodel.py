"""A tiny Stable Diffusion 2.1-family model, built in code: the demo's base model and the tests'.

Same architecture family as SD 2.1 base (UNet2DConditionModel with linear
projections and cross-attention, AutoencoderKL, CLIP text model, a CLIP BPE
tokenizer, SD 2.1 base's scheduler config) at tiny width, saved as a diffusers
folder so it loads through exactly the code path of the real model.

    skinaug base models/base     # with model.base: tiny (the demo profile)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from skinaug import prompts

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def build(out_dir: Path, seed: int = 0, resolution: int = 32) -> Path:
    """Write a randomly initialised tiny SD 2.1-family pipeline to out_dir (seconds, no downloads)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(out_dir / "_tokenizer_src")
    torch.manual_seed(seed)
    unet, vae, text_encoder = _models(vocab_size=len(tokenizer), resolution=resolution)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _remove_tree(out_dir / "_tokenizer_src")
    return out_dir


def _models(vocab_size: int, resolution: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SD 2.x
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=64,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden,
    ))
    return unet, vae, text_encoder


def _scheduler():
    from diffusers import PNDMScheduler

    from skinaug.diffusion import SD21_BASE_SCHEDULER

    return PNDMScheduler.from_config(SD21_BASE_SCHEDULER)


def make_tokenizer(folder: Path, extra_words: set[str] | None = None):
    """A CLIP BPE tokenizer whose vocabulary holds every byte and every word our prompts use."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_tables(prompts.vocabulary_words() | (extra_words or set()))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _bpe_tables(words: set[str]) -> tuple[dict[str, int], list[str]]:
    """Train a byte-level BPE (CLIP style: word ends marked </w>) until every word is one symbol."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel, WhitespaceSplit

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = WhitespaceSplit()
    alphabet = sorted(ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, special_tokens=SPECIAL, initial_alphabet=alphabet,
        end_of_word_suffix="</w>", show_progress=False,
    )
    bpe.train_from_iterator(sorted(words), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for s in alphabet:  # CLIP's vocabulary also holds every byte as a whole word
        vocab.setdefault(s + "</w>", len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return vocab, merges


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

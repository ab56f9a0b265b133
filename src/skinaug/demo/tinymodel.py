"""A tiny Stable Diffusion 2.1-family model, built in code: the demo's base model and the tests'.

Same architecture family as SD 2.1 base (UNet2DConditionModel with linear
projections and cross-attention, AutoencoderKL, CLIP text model, a CLIP BPE
tokenizer, SD 2.1 base's scheduler config) at tiny width, saved as a diffusers
folder so it loads through exactly the code path of the real model.

    skinaug base models/base     # with model.base: tiny (the demo profile)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from skinaug import prompts
from skinaug.demo import world
from skinaug.diffusion import training
from skinaug.diffusion.sd21 import SD21_BASE_SCHEDULER

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
PRETRAINED_PREDICTION = "v_prediction"  # the pretrained demo base (see `pretrain`); `build` keeps epsilon
NOISE_OFFSET = 5.0  # offset noise in pretraining, in units of the shifted schedule's noise (see `pretrain`)
SD_LATENT_SIZE = 64  # SD 2.1 base's latent grid (512 px / 8): the size its noise schedule was made for


def build(out_dir: Path, seed: int = 0, resolution: int = 32, extra_words: set[str] | None = None) -> Path:
    """Write a randomly initialised tiny SD 2.1-family pipeline to out_dir (seconds, no downloads)."""
    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(out_dir / "_tokenizer_src", extra_words)
    torch.manual_seed(seed)
    unet, vae, text_encoder = _models(vocab_size=len(tokenizer), resolution=resolution)
    _save(out_dir, unet, vae, text_encoder, tokenizer)
    return out_dir


def pretrain(out_dir: Path, seed: int, resolution: int, corpus_size: int, vae_steps: int, unet_steps: int,
             vae_batch: int, unet_batch: int) -> Path:
    """Pretrain the tiny model on the demo world's web corpus, as SD learned skin from the web.

    First the autoencoder (reconstruction + a small KL term, like SD's KL-f autoencoder),
    then the UNet and text encoder together on its latents with the captions (10 % of
    captions dropped, so classifier-free guidance has an unconditional model to contrast).
    The UNet learns v-prediction, as SD 2.1 (768) does: with SD 2.1 base's epsilon target a
    few hundred CPU steps learn to ignore the caption (at high noise, eps ~ x_t already gives
    a low loss whatever the skin tone), and generations come out one mean tone whatever the
    prompt asks; the v target is mostly the clean image there, so tone words must be read.
    The noise schedule is SD 2.1 base's, shifted for the smaller latent grid (`shifted_betas`):
    at SD's own schedule, img2img's strength 0.5 leaves a lesion a few latent pixels wide on our
    16 x 16 grid under per-pixel noise half its peak contrast, and the generations lose it,
    whereas on SD's 64 x 64 grid the same lesion spans 16 times as many pixels.
    The noise carries an offset per image and channel (NOISE_OFFSET x a Gaussian, the "offset
    noise" of Guttenberg 2023 that lets SD fine-tunes make very dark or light images): without
    it the skin tone is the one thing a noised source shows most plainly, the model learns to
    copy it, and light sources stay light whatever the prompt asks; with the offset, the
    overall colour of a noised image is not to be trusted and the caption's tone words decide
    it, while the lesion's shape, under the shifted schedule's small per-pixel noise, survives.
    A larger offset (8, 12) reaches the dark types' bands more often and keeps fewer lesions;
    the seed moves a base along that trade-off as much (benchmarks/base_tones.py, README).
    The batches (vae_batch crops, unet_batch captioned latents a step) set the cost, which is
    linear in them. Half of them (32, 16) pretrain in 0.59 of the time and darkened light skin on
    both seeds probed, but five of the six headline figures of a demo built on that base (with
    shorter adapters and backbone) moved 7-11 points between one and two threads (README, "A
    cheaper recipe, measured end to end").
    Seeded and single-process, so the same arguments give the same weights bit for bit
    on the same machine and torch version. 4-5 minutes on 2 CPU cores at the demo sizes.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    pixels, _, captions = world.web_corpus(corpus_size, seed, resolution)
    words = {w for c in captions for w in c.lower().replace("-", " - ").split()}
    tokenizer = make_tokenizer(out_dir / "_tokenizer_src", words)
    torch.manual_seed(seed)
    unet, vae, text_encoder = _models(vocab_size=len(tokenizer), resolution=resolution)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    generator = torch.Generator().manual_seed(seed)

    _pretrain_autoencoder(vae, images, vae_steps, generator, batch_size=vae_batch)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        moments = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    # SD scales latents to about unit variance; the scale is learned data, so set it the same way.
    vae.register_to_config(scaling_factor=float(1 / moments.std()))

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    betas = shifted_betas(unet.config.sample_size)  # the latent grid's side
    noise_scheduler = _training_noise(PRETRAINED_PREDICTION, betas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    bar = tqdm(range(unet_steps), desc="pretrain unet + text encoder", mininterval=2)
    for _ in bar:
        index = torch.randint(0, len(images), (unet_batch,), generator=generator)
        latents = moments[index] * vae.config.scaling_factor
        batch_ids = torch.where(torch.rand(unet_batch, 1, generator=generator) < 0.1, empty, ids[index])
        loss = training.denoising_loss(unet, noise_scheduler, latents, text_encoder(batch_ids)[0], generator,
                                        noise_offset=NOISE_OFFSET)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    _save(out_dir, unet.eval(), vae, text_encoder.eval(), tokenizer, PRETRAINED_PREDICTION, betas)
    return out_dir


def shifted_betas(latent_size: int) -> list[float]:
    """SD 2.1 base's betas with each timestep's signal-to-noise ratio times (64 / latent_size)^2.

    A shape spanning a fixed share of the image covers (64 / latent_size)^2 times fewer latent
    pixels on a small grid than on SD's 64 x 64 one, so the same per-pixel noise hides it that
    much more; multiplying the SNR by that factor (the resolution shift of Hoogeboom et al. 2023,
    "simple diffusion", and SD 3) is meant to make strength 0.5 keep as much of a lesion as in SD.
    Saved as the scheduler's `trained_betas`, so every stage reads it from the base folder.
    """
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(SD21_BASE_SCHEDULER).alphas_cumprod.double()
    snr = alphas_cumprod / (1 - alphas_cumprod) * (SD_LATENT_SIZE / latent_size) ** 2
    shifted = snr / (1 + snr)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), shifted[:-1]])
    return (1 - shifted / previous).tolist()


def _pretrain_autoencoder(vae, images: torch.Tensor, steps: int, generator: torch.Generator, *,
                          batch_size: int, crop: int = 16, lr: float = 3e-3) -> None:
    """Train the KL autoencoder on random crops (it is convolutional; SD's trained on 256 px crops).

    An L1 reconstruction keeps the lesions' edges (MSE blurs them first), plus SD's small KL
    term; a one-cycle learning rate. A half-size crop costs a quarter of the whole image, so
    the few minutes allowed buy enough steps to reconstruct marks the corpus never showed.
    """
    from tqdm import tqdm

    _start_nearly_deterministic(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    size = images.shape[-1]
    crop = min(crop, size)
    bar = tqdm(range(steps), desc="pretrain autoencoder", mininterval=2)
    for _ in bar:
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        top, left = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
        batch = batch[:, :, top:top + crop, left:left + crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.l1_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def _start_nearly_deterministic(vae, log_variance: float = -12.0) -> None:
    """Start the encoder's posterior log-variance where SD's trained KL-f autoencoder has it: tiny.

    Fresh, the posterior std is about 1, as wide as the latents themselves, and a few hundred
    Adam steps at lr 1e-3 move the log-variance by a few tenths only. Every `latent_dist.sample()`
    downstream (textual inversion, LoRA, img2img's encoding of the source) would then drown the
    lesion in encoder noise the UNet never saw in pretraining (it learns on posterior means).
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = log_variance


def _save(out_dir: Path, unet, vae, text_encoder, tokenizer, prediction_type: str = "epsilon",
          betas: list[float] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(prediction_type, betas), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(out_dir / "_tokenizer_src", ignore_errors=True)


def _training_noise(prediction_type: str, betas: list[float] | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD21_BASE_SCHEDULER, prediction_type=prediction_type, trained_betas=betas)


def _models(vocab_size: int, resolution: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
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


def _scheduler(prediction_type: str, betas: list[float] | None = None):
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD21_BASE_SCHEDULER, prediction_type=prediction_type, trained_betas=betas)


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
    """Learn byte-level BPE merges (CLIP style: word ends marked </w>) until every word is one symbol.

    Plain BPE training, most frequent pair first, ties broken alphabetically: deterministic
    (the `tokenizers` trainer is not), and encoding with these merges gives each word one token.
    """
    from collections import Counter

    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in SPECIAL + alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(words)]
    merges: list[str] = []
    while True:
        pairs = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not pairs:
            return vocab, merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(" ".join(best))
        vocab.setdefault("".join(best), len(vocab))
        corpus = [_merge(word, best) for word in corpus]


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out

"""Speed of our stages against the reference implementation, and against the card's own limit.

    skinaug bench            # on a GPU: SD 2.1-base architecture, random weights (139–142 s on an H200, 2026-11-30)
    skinaug bench --tiny     # anywhere: the same code on the tiny model at 16 px (seconds on a CPU)

Speed does not depend on weight values, so the SD 2.1-base architecture is built from its
configs with random weights (no download), saved as a diffusers folder and loaded through the
real code paths: `StableDiffusionImg2ImgPipeline` and the diffusers examples' training steps
(written compactly below) for the reference way; generate.py and finetune.py for ours. Both
run in one process on one card, each with untimed warm-up and a fixed number of timed
iterations. Prints one table and writes JSON (figures, card, versions, settings) to
benchmarks/results/{date}_{device}.json. --tiny figures only show that the code runs.

Expect on an H200 (../shared/BENCHMARKS.md): the reference generation loop at about
2.4 images/s, 27 % of the bf16 matmul rate; identical-settings generation cannot beat it by
more than about 3.7x. Training figures are per update; end-to-end TI and the study estimate
add the measured model loading and caching costs (see study_estimate).

Over 300 lines: each reference implementation sits beside ours so that the two are timed alike;
it is set apart from the method (nothing in the pipeline imports bench/).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import hashlib
import platform
import random
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from skinaug import atomic, config, paper, prompts
from skinaug.data import trainset
from skinaug.diffusion import sd21, training
from skinaug.diffusion.sd21 import SD21_BASE_SCHEDULER, SD21_BASE_TEXT_ENCODER, SD21_BASE_UNET, SD21_BASE_VAE

# --- what is measured ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """One bench run. Sampler and training numbers are the reference code's (SPEC §3-4)."""
    tiny: bool
    resolution: int  # model side in pixels
    image_size: tuple[int, int]  # (width, height) of the stand-in JPEGs; not square, like most real ones
    per_source: int = 5  # synthetic images per source: the reference's num_images_per_prompt
    strength: float = 0.5  # img2img strength
    steps: int = 100  # PNDM steps (about strength * steps of them run)
    guidance: float = 2.0  # classifier-free guidance scale
    fast_steps: int = 20  # DPM-Solver++ steps of the labelled faster-sampler experiment
    ref_sources: int = 3  # sources timed through the reference loop (one pipeline call each)
    train_batch: int = 4  # reference batch: TI (per token) and LoRA
    ti_grad_accum: int = 4  # reference TI gradient accumulation
    train_updates: int = 5  # timed optimiser updates per training path
    warmup: int = 1  # untimed iterations before each timing
    per_label: int = 8  # stand-in training images per label
    classifier_batch: int = 256
    classifier_size: int = 256  # cached image side (the reference's Resize(256))
    classifier_crop: int = 224
    classifier_batches: int = 3  # timed batches per architecture
    decode_images: int = 16  # images timed through the reference classifiers' per-epoch decoding
    matmul_n: int = 8192  # side of the square matmuls measuring the card's rate
    matmul_iters: int = 10


FULL = Settings(tiny=False, resolution=512, image_size=(640, 480))
TINY = Settings(tiny=True, resolution=16, image_size=(20, 15), steps=4, fast_steps=2, ref_sources=1,
                ti_grad_accum=1, train_updates=2, per_label=2, classifier_batch=8, classifier_size=36,
                classifier_crop=32, classifier_batches=1, decode_images=4, matmul_n=512)
WORKLOADS = ("generation", "ti", "lora", "classifiers")


@dataclass(frozen=True)
class Study:
    """The paper profile's whole study (SPEC §2-5): what the GPU-hour estimate multiplies (Study.of)."""
    seeds: int
    tokens: int
    ti_steps: int  # optimiser updates per token
    ti_images_per_step: int  # batch x gradient accumulation, per token
    lora_steps: int
    lora_batch: int
    per_source: int
    train_images: dict  # per scenario (paper.SPLIT_SIZES)
    test_images: dict
    classifier_archs: tuple[str, ...]
    classifier_epochs: int  # an epoch draws as many images as the training set holds

    @classmethod
    def of(cls, cfg: config.Config | None) -> Study:
        """The paper profile's numbers: params' when params are the paper profile, else conf/'s."""
        if cfg is None or cfg.profile != "paper":
            cfg = paper_config()
        ti, cl = cfg.textual_inversion, cfg.classify
        return cls(seeds=len(cfg.splits.seeds), tokens=len(cfg.subset.labels), ti_steps=ti.steps,
                   ti_images_per_step=ti.batch_size * ti.grad_accum, lora_steps=cfg.lora.steps,
                   lora_batch=cfg.lora.batch_size, per_source=cfg.generate.per_source,
                   train_images={sc: n for sc, (n, _) in paper.SPLIT_SIZES.items()},
                   test_images={sc: n for sc, (_, n) in paper.SPLIT_SIZES.items()},
                   classifier_archs=tuple(cl.archs), classifier_epochs=cl.epochs)


REFERENCE_LOADER_WORKERS = 4  # ASSUMED DataLoader workers decoding images for the reference classifiers
OUR_DECODE_THREADS = 8  # classify.decode_images' thread pool (images decoded once per classifier)

def paper_config() -> config.Config:
    """The paper profile: what 'ours' runs when params.yaml is not it."""
    return config.compose("paper")


def ours_config(cfg: config.Config | None, s: Settings, device: torch.device, base_dir: Path) -> config.Config:
    """The paper profile (params when they are it, else conf/'s) at the reference's sampler and
    batch sizes: what 'ours' runs. On a CPU everything runs in fp32."""
    if cfg is None or cfg.profile != "paper":
        cfg = paper_config()
    precision = "no" if device.type == "cpu" else cfg.model.mixed_precision
    steps = s.warmup + s.train_updates
    return replace(
        cfg,
        subset=replace(cfg.subset, labels=list(prompts.TOKENS)),
        model=replace(cfg.model, base=str(base_dir), resolution=s.resolution, mixed_precision=precision,
                      device=device.type),
        textual_inversion=replace(cfg.textual_inversion, init_token="skin", steps=steps, batch_size=s.train_batch,
                                  grad_accum=s.ti_grad_accum),
        lora=replace(cfg.lora, steps=steps, batch_size=s.train_batch, mode="joint"),
        generate=replace(cfg.generate, per_source=s.per_source, strength=s.strength, steps=s.steps,
                         guidance=s.guidance),
    )


# --- the card --------------------------------------------------------------------------------------

def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """Sets out['peak_memory_gb'] to the most GPU memory allocated inside the block (None on a CPU)."""
    if device.type == "cuda":
        release()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def release() -> None:
    """Return the memory of models just dropped (each workload starts from an empty card)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, device: torch.device, iters: int = 1, warmup: int = 0) -> float:
    """Seconds per call of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def matmul_rate(device: torch.device, s: Settings) -> dict:
    """The card's arithmetic ceiling: median FLOP/s of square matmuls (bf16 on a GPU, fp32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(s.matmul_n, s.matmul_n, device=device, dtype=dtype) for _ in range(2))
    timed(lambda: a @ b, device, warmup=2)
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(s.matmul_iters))
    kind = "bf16" if device.type == "cuda" else "fp32 (CPU)"
    return {"flop_per_s": 2 * s.matmul_n ** 3 / seconds,
            "label": f"{kind} {s.matmul_n}^3 matmul, median of {s.matmul_iters}"}


def count_flops(fn) -> int:
    """FLOPs of one call of fn, by torch.utils.flop_counter (1 multiply-add = 2 FLOP).

    Attention runs as SDPA's math backend here: the counter has no formula for the CPU fused
    kernel, so this counts attention's two matmuls the same way on every device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(unet, batch: int = 1, latent_size: int | None = None, tokens: int = 77) -> int:
    """One UNet forward of `batch` samples (4 x latent_size^2 latents, a 77-token context)."""
    p = next(unet.parameters())
    size = latent_size or unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=p.device, dtype=p.dtype)
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    t = torch.full((batch,), 500, device=p.device)
    return count_flops(lambda: unet(latents, t, context))


def image_flops(pipe, resolution: int, per_source: int, unet_calls: int, guidance: float) -> dict:
    """FLOPs of one synthetic image at the reference settings: its UNet calls (x2 with guidance),
    its VAE decode, and its share of the source's VAE encode and of the prompt encodings."""
    p = next(pipe.unet.parameters())
    latent = resolution // pipe.vae_scale_factor
    pixels = torch.randn(1, 3, resolution, resolution, device=p.device, dtype=p.dtype)
    latents = torch.randn(1, 4, latent, latent, device=p.device, dtype=p.dtype)
    ids = torch.zeros(1, 77, dtype=torch.long, device=p.device)
    cfg = 2 if guidance > 1 else 1
    unet = unet_flops(pipe.unet, 1, latent) * unet_calls * cfg
    other = (count_flops(lambda: pipe.vae.decode(latents)) + count_flops(lambda: pipe.vae.encode(pixels)) / per_source
             + count_flops(lambda: pipe.text_encoder(ids)) * cfg / per_source)
    return {"unet_tflop": unet / 1e12, "total_tflop": (unet + other) / 1e12, "unet_calls_per_image": unet_calls * cfg}


# --- the model and stand-in data -------------------------------------------------------------------

def build_base(out_dir: Path, s: Settings, device: torch.device, seed: int = 0) -> Path:
    """A diffusers folder with random weights: the SD 2.1-base architecture, or with --tiny the tiny model."""
    from skinaug.demo import tinymodel

    if s.tiny:
        return tinymodel.build(out_dir, seed=seed, resolution=s.resolution)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tinymodel.make_tokenizer(out_dir / "_tokenizer_src")
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the card: seconds, not a minute on the CPU
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        vae = AutoencoderKL(**SD21_BASE_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_BASE_TEXT_ENCODER))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD21_BASE_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(out_dir / "_tokenizer_src", ignore_errors=True)
    return out_dir


def write_train_split(folder: Path, s: Settings, seed: int = 0):
    """Stand-in training images (JPEG, smooth random colour fields, per_label per label) and train.csv."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in prompts.TOKENS:
        for i in range(s.per_label):
            md5 = hashlib.md5(f"{label} {i}".encode()).hexdigest()
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            coarse.resize(s.image_size, Image.BICUBIC).save(images / f"{md5}.jpg", quality=90)
            rows.append({"md5hash": md5, "fitzpatrick_scale": (1, 2, 5, 6)[i % 4], "label": label})
    train = pd.DataFrame(rows)
    train.to_csv(folder / "train.csv", index=False)
    return train, images


# --- 1. generation ---------------------------------------------------------------------------------

@contextlib.contextmanager
def counting_calls(module):
    """Yield a one-element list: the number of forward calls of module inside the block."""
    count = [0]
    handle = module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def reference_generation(base_dir: Path, sources: list, prompt: str, s: Settings, device: torch.device) -> dict:
    """REFERENCE METHOD: one source per StableDiffusionImg2ImgPipeline call, fp16 (fp32 on a CPU),
    5 images per prompt from one generator (seeded with the call's index), PNDM, PIL output.
    images[i] are source i's 5 images; i = 0 is the warm-up call's, repeated as timed call 0."""
    from diffusers import StableDiffusionImg2ImgPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base_dir, dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    images = []

    def call():
        i = len(images)
        with warnings.catch_warnings():  # one image, 5 per prompt: the reference's (deprecated) way
            warnings.filterwarnings("ignore", "You have passed", FutureWarning)
            images.append(pipe(prompt, image=sources[i % len(sources)], strength=s.strength,
                               num_inference_steps=s.steps, guidance_scale=s.guidance,
                               num_images_per_prompt=s.per_source,
                               generator=torch.Generator("cpu").manual_seed(i)).images)

    with counting_calls(pipe.unet) as calls:
        call()  # warm-up; also counts the UNet calls per source
    images.clear()
    out = {"load_s": load_s}
    with peak_memory(device, out):
        seconds = timed(call, device, iters=s.ref_sources)
    flops = image_flops(pipe, s.resolution, s.per_source, calls[0], s.guidance)
    del pipe
    release()
    return {**out, "images_per_s": s.per_source / seconds, "flops": flops, "images": images}


def ours_generation(cfg: config.Config, rows: list[dict], images_dir: Path, device: torch.device,
                    fast_steps: int) -> dict:
    """Our generation stage: generate.py's pipeline and its batched call, one generator per image;
    one call of len(rows) images timed after a warm-up call, with the base model's PNDM and then
    (the labelled different setting) DPM-Solver++ at fast_steps."""
    from diffusers import DPMSolverMultistepScheduler

    from skinaug.diffusion import generate

    strategy = generate.strategy_of("img2img_vanilla")  # no adapters in either path (benchmarks/README.md)
    start = time.perf_counter()
    pipe = generate.load_pipeline(Path(cfg.model.base), strategy, {}, {}, cfg, device,
                                  sd21.weight_dtype(cfg.model, device))
    sync(device)
    out = {"load_s": time.perf_counter() - start, "images_per_call": len(rows)}

    def measure(c: config.Config, into: dict) -> list:
        images = []
        generate.synthesize(pipe, strategy, rows, images_dir, c)  # warm-up
        with peak_memory(device, into):
            seconds = timed(lambda: images.extend(generate.synthesize(pipe, strategy, rows, images_dir, c)), device)
        into["images_per_s"] = len(rows) / seconds
        return images

    images = measure(cfg, out)
    fast = {}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    fast_images = measure(replace(cfg, generate=replace(cfg.generate, steps=fast_steps)), fast)
    del pipe
    release()
    return {**out, "images": images, "fast": {**fast, "images": fast_images}}


def generation_rows(sources: list[str], n: int, per_source: int, prompt: str) -> list[dict]:
    """Plan rows for our path: n images, per_source per source in order. Image 0 of source i has
    seed i, as the reference's call i, so the two paths can be compared for the same seed."""
    return [{"source_md5hash": sources[j // per_source], "prompt": prompt,
             "seed": j // per_source if j % per_source == 0 else 1_000_003 * (j + 1)} for j in range(n)]


def image_difference(a: list, b: list) -> dict:
    """Mean and max absolute pixel difference (0-255), mean colour difference, mean |ITA difference|."""
    from skinaug import tone

    x = np.stack([np.asarray(i, dtype=np.float32) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float32) for i in b])
    ita = [abs(tone.skin_ita(np.asarray(i)) - tone.skin_ita(np.asarray(j))) for i, j in zip(a, b)]
    return {"mean_abs_pixel": float(np.abs(x - y).mean()), "max_abs_pixel": float(np.abs(x - y).max()),
            "mean_colour": float(np.abs(x.mean((1, 2)) - y.mean((1, 2))).mean()), "mean_abs_ita": float(np.mean(ita))}


def bench_generation(base_dir: Path, cfg: config.Config, train, images_dir: Path, s: Settings,
                     device: torch.device, ceiling: float) -> dict:
    """Reference loop and our batched call at the same sampler settings, then the faster sampler."""
    from skinaug.diffusion import generate, sd21

    prompt = prompts.skin_prompt("psoriasis", 6, use_tokens=False)
    md5s = list(train.md5hash)
    sources = [trainset.open_image(images_dir / f"{m}.jpg", s.resolution) for m in md5s]
    ref = reference_generation(base_dir, sources, prompt, s, device)
    batch = generate.batch_size(cfg, device, sd21.weight_dtype(cfg.model, device))
    rows = generation_rows(md5s, max(batch, s.per_source * min(s.ref_sources, 2)), s.per_source, prompt)
    ours = ours_generation(cfg, rows, images_dir, device, s.fast_steps)
    fast = ours.pop("fast")
    tflop = ref["flops"]["total_tflop"]
    for r in (ref, ours):
        r["mfu"] = r["images_per_s"] * tflop * 1e12 / ceiling
    same_seed = [(ref["images"][i][0], ours["images"][i * s.per_source]) for i in range(min(s.ref_sources, 2))]
    return {
        "flops": ref.pop("flops"),
        "reference": {k: v for k, v in ref.items() if k != "images"},
        "ours": {k: v for k, v in ours.items() if k != "images"},
        "ratio": ours["images_per_s"] / ref["images_per_s"],
        # image 0 of each source only: the reference draws its 5 images from one generator
        # (VAE sample, then 5 noises); ours draws each image from its own generator
        "same_seed_difference": image_difference(*zip(*same_seed)),
        "fast_sampler": {
            "setting": f"DPM-Solver++ {s.fast_steps} steps (vs PNDM {s.steps}) at strength {s.strength}: "
                       "a DIFFERENT SETTING, not the reference's",
            "images_per_s": fast["images_per_s"], "peak_memory_gb": fast["peak_memory_gb"],
            "speedup_vs_ours": fast["images_per_s"] / ours["images_per_s"],
            "speedup_vs_reference": fast["images_per_s"] / ref["images_per_s"],
            "difference_vs_pndm": image_difference(fast["images"], ours["images"]),
        },
    }


# --- 2-3. fine-tuning: the reference steps ---------------------------------------------------------

def _load_training_models(base_dir: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder"),
            AutoencoderKL.from_pretrained(base_dir, subfolder="vae"),
            UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"),
            DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler"))


def _reference_pixels(paths: list[Path], res: int, crop: bool, rng: random.Random) -> torch.Tensor:
    """The examples' data path, in the training process (their default: no DataLoader workers):
    decode, resize (TI: bicubic to res x res; LoRA: bilinear shorter side, random crop), flip."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop:
                scale = res / min(im.size)
                im = im.resize((max(res, int(im.width * scale)), max(res, int(im.height * scale))), Image.BILINEAR)
                x, y = rng.randint(0, im.width - res), rng.randint(0, im.height - res)
                im = im.crop((x, y, x + res, y + res))
            else:
                im = im.resize((res, res), Image.BICUBIC)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def _ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def reference_textual_inversion(base_dir: Path, paths: list[Path], s: Settings, device: torch.device) -> dict:
    """REFERENCE METHOD, one token (the diffusers textual_inversion example's step, compact): UNet
    and VAE in fp16, the text encoder fp32 under fp16 autocast, batch 4 x gradient accumulation 4,
    the VAE encoding every batch, AdamW over the whole embedding matrix with every row but the new
    token's restored after each batch. Returns the load and per-update seconds."""
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    rng = random.Random(0)
    start = time.perf_counter()
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load_training_models(base_dir)
    token = prompts.token("psoriasis")
    tokenizer.add_tokens(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.data[token_id] = embeddings.data[tokenizer.encode("skin", add_special_tokens=False)[0]].clone()
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    for module in (vae, unet, text_model.encoder, text_model.final_layer_norm,
                   text_model.embeddings.position_embedding):
        module.requires_grad_(False)
    unet.to(device, half)
    vae.to(device, half)
    text_encoder.to(device).train()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(),
                                  lr=5e-4 * s.train_batch * s.ti_grad_accum, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    original = embeddings.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[token_id] = False
    sync(device)
    load_s = time.perf_counter() - start

    def update():
        for _ in range(s.ti_grad_accum):
            pixels = _reference_pixels(rng.choices(paths, k=s.train_batch), s.resolution, crop=False, rng=rng)
            texts = [rng.choice(prompts.TI_TEMPLATES["authors"]).format(token) for _ in range(s.train_batch)]
            ids = _ids(tokenizer, texts, device)
            latents = vae.encode(pixels.to(device, half)).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                context = text_encoder(ids)[0].to(half)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, context).sample
            scaler.scale(F.mse_loss(pred.float(), noise.float()) / s.ti_grad_accum).backward()
            with torch.no_grad():
                embeddings[keep] = original[keep]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    seconds = timed(update, device, iters=s.train_updates, warmup=s.warmup)
    del text_encoder, vae, unet, optimizer, embeddings, original
    release()
    images = s.train_batch * s.ti_grad_accum
    return {"load_s": load_s, "update_s": seconds, "images_per_update": images, "images_per_s": images / seconds}


def reference_lora(base_dir: Path, train, images_dir: Path, s: Settings, device: torch.device) -> dict:
    """REFERENCE METHOD (the diffusers train_text_to_image_lora example's step, compact): fp16
    autocast over fp32 weights, as the anchor measured it; rank-8 LoRA on the attention
    projections; batch 4; the VAE and the text encoder run every batch; grad-norm clip 1; AdamW."""
    from peft import LoraConfig

    cuda = device.type == "cuda"
    rng = random.Random(0)
    start = time.perf_counter()
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load_training_models(base_dir)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(device)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    rows = train.to_dict("records")
    sync(device)
    load_s = time.perf_counter() - start

    def update():
        batch = rng.choices(rows, k=s.train_batch)
        pixels = _reference_pixels([images_dir / f"{r['md5hash']}.jpg" for r in batch], s.resolution, True, rng)
        ids = _ids(tokenizer, [prompts.skin_prompt(r["label"], r["fitzpatrick_scale"], False) for r in batch], device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            latents = vae.encode(pixels.to(device)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    seconds = timed(update, device, iters=s.train_updates, warmup=s.warmup)
    del text_encoder, vae, unet, optimizer, params
    release()
    return {"load_s": load_s, "update_s": seconds, "images_per_update": s.train_batch,
            "images_per_s": s.train_batch / seconds}


# --- 2-3. fine-tuning: ours --------------------------------------------------------------------------

def _ours_run(train_fn, device: torch.device, s: Settings, images_per_update: int) -> dict:
    """Time one finetune.py run end to end and per update (from its on_step callback)."""
    stamps = []

    def on_step(*_):
        sync(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    train_fn(on_step)
    total = time.perf_counter() - start
    update_s = (stamps[-1] - stamps[s.warmup - 1]) / s.train_updates if s.warmup else (stamps[-1] - start) / len(stamps)
    release()
    return {"total_s": total, "updates": len(stamps), "update_s": update_s,
            "fixed_s": total - len(stamps) * update_s,  # loading, caching, the warm-up's extra, saving
            "images_per_update": images_per_update, "images_per_s": images_per_update / update_s}


def ours_textual_inversion(cfg: config.Config, train_csv: Path, images_dir: Path, out_dir: Path,
                           s: Settings, device: torch.device) -> dict:
    """Our joint run over all seven tokens (finetune.train_textual_inversion), and the cost of
    caching one more image's VAE posteriors (what a larger split adds to the fixed cost)."""
    from skinaug.diffusion import finetune

    ti = cfg.textual_inversion
    images = len(cfg.subset.labels) * ti.batch_size * ti.grad_accum
    result = _ours_run(lambda cb: finetune.train_textual_inversion(
        train_csv, images_dir, Path(cfg.model.base), out_dir, cfg, seed=0, on_step=cb), device, s, images)
    return {**result, "cache_s_per_image": _caching_cost(cfg, images_dir, device)}


def _caching_cost(cfg: config.Config, images_dir: Path, device: torch.device) -> float:
    """Seconds per image of what our TI does once per training image: decode, bicubic resize,
    and the VAE posterior of both flips (diffusion.latent_moments), 8 images per call."""
    from diffusers import AutoencoderKL

    from skinaug.diffusion import sd21

    res = cfg.model.resolution
    vae = AutoencoderKL.from_pretrained(cfg.model.base, subfolder="vae").to(
        device, sd21.weight_dtype(cfg.model, device))
    paths = sorted(Path(images_dir).glob("*.jpg"))[:8]

    @torch.no_grad()
    def cache():
        arrays = []
        for path in paths:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB").resize((res, res), Image.BICUBIC))
            arrays += [array, array[:, ::-1]]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        training.latent_moments(vae, pixels.to(device))

    seconds = timed(cache, device, warmup=1)
    del vae
    release()
    return seconds / len(paths)


def ours_lora(cfg: config.Config, train_csv: Path, images_dir: Path, out_dir: Path, s: Settings,
              device: torch.device) -> dict:
    """Our LoRA run (finetune.train_lora, joint, at the reference's batch size)."""
    from skinaug.diffusion import finetune

    return _ours_run(lambda cb: finetune.train_lora(train_csv, images_dir, Path(cfg.model.base), None, out_dir, cfg,
                                                    seed=0, on_step=cb), device, s, cfg.lora.batch_size)


def bench_textual_inversion(base_dir: Path, cfg: config.Config, tmp: Path, images_dir: Path, s: Settings,
                            study: Study, device: torch.device) -> dict:
    """Per update, and end to end for the paper's 7 tokens x 500 updates with model loading
    included: the reference loads the model once per token, ours once for all seven."""
    ref = reference_textual_inversion(base_dir, sorted(images_dir.glob("*.jpg")), s, device)
    ours = ours_textual_inversion(cfg, tmp / "split/train.csv", images_dir, tmp / "ti", s, device)
    images = study.ti_steps * study.ti_images_per_step * study.tokens
    end_to_end = {"reference": images / (study.tokens * ref["load_s"] + images / ref["images_per_s"]),
                  "ours": images / (ours["fixed_s"] + images / ours["images_per_s"])}
    return {"reference": ref, "ours": ours, "end_to_end_images_per_s": end_to_end,
            "ratio": end_to_end["ours"] / end_to_end["reference"],
            "ratio_per_update": ours["images_per_s"] / ref["images_per_s"]}


# --- classifiers -----------------------------------------------------------------------------------

def bench_classifiers(archs, images_dir: Path, s: Settings, device: torch.device, workdir: Path) -> dict:
    """Ours: classify.train_one_epoch on images decoded once into a tensor on the device (frozen
    backbone, reference head, batch 256, 224 px). The reference's loop runs the same model but
    decodes and augments every image on the CPU every epoch; its rate is estimated as the slower
    of the model's and REFERENCE_LOADER_WORKERS cores' decoding (measured per core, labelled)."""
    from skinaug.classify import classifiers

    n = s.classifier_batch * s.classifier_batches
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, s.classifier_size, s.classifier_size), dtype=torch.uint8, generator=g)
    data = classifiers.ImageSet(images.to(device), (torch.arange(n) % 7).to(device), None)
    warm = classifiers.ImageSet(data.images[:s.classifier_batch], data.targets[:s.classifier_batch], None)
    out = {}
    for arch in archs:
        model = classifiers.build_classifier(arch, 7, pretrained=False, freeze_backbone=True,
                                          image_size=s.classifier_crop).to(device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        epoch = functools.partial(classifiers.train_one_epoch, model, batch_size=s.classifier_batch,
                                  optimizer=optimizer, crop_size=s.classifier_crop, generator=g)
        epoch(warm)
        seconds = timed(lambda: epoch(data), device)
        eval_s = timed(lambda: classifiers.evaluate(model, data, s.classifier_batch, s.classifier_crop), device, warmup=1)
        out[arch] = {"train_images_per_s": n / seconds, "eval_images_per_s": n / eval_s}
        del model, optimizer
        release()
    real = sorted(Path(images_dir).glob("*.jpg"))
    syn = workdir / "syn.png"  # a synthetic image as the generation stage saves it (256 px PNG)
    Image.open(real[0]).convert("RGB").resize((256, 256)).save(syn)
    return {"archs": out, "decode_s_per_image": {
        "real_jpeg": _reference_decode_cost(real[: s.decode_images], s),
        "synthetic_png": _reference_decode_cost([syn] * s.decode_images, s)}}


def _reference_decode_cost(paths: list[Path], s: Settings) -> float:
    """Seconds per image, one core, of the reference's per-epoch data path: PIL decode, then
    RandomResizedCrop(256, 0.8-1), RandomRotation(15), ColorJitter(), flip, CenterCrop(224), normalise."""
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(s.classifier_size, scale=(0.8, 1.0)), T.RandomRotation(15),
                           T.ColorJitter(), T.RandomHorizontalFlip(), T.CenterCrop(s.classifier_crop), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load = lambda p: transform(Image.open(p).convert("RGB"))  # noqa: E731
        load(paths[0])
        start = time.perf_counter()
        for path in paths:
            load(path)
        return (time.perf_counter() - start) / len(paths)
    finally:
        torch.set_num_threads(threads)


# --- 4. the whole study ------------------------------------------------------------------------------

def study_estimate(r: dict, study: Study, s: Settings) -> dict:
    """GPU-hours of the paper profile's study (every scenario x seed) from the measured figures.

    TI: the reference loads the model once per token and runs 500 updates of 16 images; ours
    loads once, caches every training image's posteriors, and runs 500 updates of 7 x 16.
    LoRA: 3000 updates of 4. Generation: 5 images per training image. Classifiers: 3 archs x
    3 train types x 30 epochs; ours decode each image once (8 threads), the reference every
    epoch (REFERENCE_LOADER_WORKERS, assumed), both evaluate the test set every epoch.
    """
    bench_images = s.per_label * study.tokens
    hours = {"reference": {}, "ours": {}}
    for sc, n_train in study.train_images.items():
        n_syn, n_test = study.per_source * n_train, study.test_images[sc]
        ti_ref, ti_ours = r["ti"]["reference"], r["ti"]["ours"]
        ti_images = study.ti_steps * study.ti_images_per_step
        lora_ref, lora_ours = r["lora"]["reference"], r["lora"]["ours"]
        lora_images = study.lora_steps * study.lora_batch
        gen_ref, gen_ours = r["generation"]["reference"], r["generation"]["ours"]
        add = {
            "ti": (study.tokens * (ti_ref["load_s"] + ti_images / ti_ref["images_per_s"]),
                   ti_ours["fixed_s"] + (n_train - bench_images) * ti_ours["cache_s_per_image"]
                   + study.tokens * ti_images / ti_ours["images_per_s"]),
            "lora": (lora_ref["load_s"] + lora_images / lora_ref["images_per_s"],
                     lora_ours["fixed_s"] + lora_images / lora_ours["images_per_s"]),
            "generation": (gen_ref["load_s"] + n_syn / gen_ref["images_per_s"],
                           gen_ours["load_s"] + n_syn / gen_ours["images_per_s"]),
            "classifiers": _classifier_seconds(r["classifiers"], study, n_train, n_syn, n_test),
        }
        for stage, (ref, ours) in add.items():
            hours["reference"][stage] = hours["reference"].get(stage, 0) + study.seeds * ref / 3600
            hours["ours"][stage] = hours["ours"].get(stage, 0) + study.seeds * ours / 3600
    for way in hours.values():
        way["total"] = sum(way.values())
    return {**hours, "ratio": hours["reference"]["total"] / hours["ours"]["total"],
            "note": "estimate from the measured rates; reference classifier decoding assumes "
                    f"{REFERENCE_LOADER_WORKERS} loader workers"}


def _classifier_seconds(c: dict, study: Study, n_train: int, n_syn: int, n_test: int) -> tuple[float, float]:
    decode = c["decode_s_per_image"]
    ref = ours = 0.0
    for arch in study.classifier_archs:
        rate = c["archs"][arch]
        for real, syn in ((n_train, 0), (0, n_syn), (n_train, n_syn)):
            n = real + syn
            model_s = study.classifier_epochs * (n / rate["train_images_per_s"] + n_test / rate["eval_images_per_s"])
            decode_s = real * decode["real_jpeg"] + syn * decode["synthetic_png"] + n_test * decode["real_jpeg"]
            ours += model_s + decode_s / OUR_DECODE_THREADS
            ref += study.classifier_epochs * max(n / rate["train_images_per_s"] + n_test / rate["eval_images_per_s"],
                                                 decode_s / REFERENCE_LOADER_WORKERS)
    return ref, ours


# --- the run -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _stage(name: str):
    start, cpu = time.perf_counter(), time.process_time()
    print(f"bench: {name}...", flush=True)
    yield
    print(f"bench: {name} took {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)", flush=True)


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def run(out_dir: Path, tiny: bool = False, device: str = "auto", only: tuple[str, ...] = WORKLOADS,
        cfg: config.Config | None = None, base: Path | None = None, settings: Settings | None = None) -> dict:
    """Measure every workload in `only`; write the JSON into out_dir and return it (with 'table' and 'path').

    cfg: params when present (Study.of reads the paper profile's numbers); base: benchmark this
    diffusers folder instead of random weights (a real model makes the faster sampler's image
    differences meaningful).
    """
    dev = sd21.pick_device(device)
    s = settings or (TINY if tiny else FULL)
    study = Study.of(cfg)
    unknown = sorted(set(only) - set(WORKLOADS))
    if unknown:
        raise config.ConfigError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    today = datetime.date.today().isoformat()
    result = {"date": today, "device": dev.type, "card": card_name(dev), "tiny": s.tiny, "versions": versions(),
              "base": str(base) if base else ("tiny model" if s.tiny else "SD 2.1-base architecture, random weights"),
              "settings": asdict(s), "study": asdict(study)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skinaug-bench-") as tmp:
        tmp = Path(tmp)
        with _stage("model and stand-in data"):
            base_dir = sd21.check_base(base) if base else build_base(tmp / "base", s, dev)
            train, images_dir = write_train_split(tmp / "split", s)
        ours_cfg = ours_config(cfg, s, dev, base_dir)
        precision = ours_cfg.model.mixed_precision
        result["precision"] = {"reference": "fp16" if dev.type == "cuda" else "fp32",
                               "ours": "fp32" if precision == "no" else precision}
        result["matmul"] = matmul_rate(dev, s)
        ceiling = result["matmul"]["flop_per_s"]
        if "generation" in only:
            with _stage("generation"):
                result["generation"] = bench_generation(base_dir, ours_cfg, train, images_dir, s, dev, ceiling)
        if "ti" in only:
            with _stage("textual inversion"):
                result["ti"] = bench_textual_inversion(base_dir, ours_cfg, tmp, images_dir, s, study, dev)
        if "lora" in only:
            with _stage("lora"):
                ref = reference_lora(base_dir, train, images_dir, s, dev)
                ours = ours_lora(ours_cfg, tmp / "split/train.csv", images_dir, tmp / "lora", s, dev)
                result["lora"] = {"reference": ref, "ours": ours, "ratio": ours["images_per_s"] / ref["images_per_s"]}
        if "classifiers" in only:
            with _stage("classifiers"):
                result["classifiers"] = bench_classifiers(study.classifier_archs, images_dir, s, dev, tmp)
        if set(WORKLOADS) <= set(only):
            result["study_hours"] = study_estimate(result, study, s)
    result["seconds"] = time.perf_counter() - started
    result["table"] = table(result)
    slug = "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", result["card"].lower()).strip("-")
    path = Path(out_dir) / f"{today}_{slug}{'-tiny' if s.tiny else ''}.json"
    atomic.write_json(path, result)
    result["path"] = str(path)
    return result


# --- the table -------------------------------------------------------------------------------------

def table(r: dict) -> str:
    """One markdown table: reference, ours, ours / reference, and what each row measured."""
    head = (f"skinaug bench: {r['card']}{' (--tiny: TINY model, not the real figures)' if r['tiny'] else ''}; "
            f"reference {r['precision']['reference']}, ours {r['precision']['ours']}; "
            f"ceiling {r['matmul']['flop_per_s'] / 1e12:.3g} TFLOP/s ({r['matmul']['label']})")
    rows = []

    def row(name, ref, ours, ratio, note, fmt="{:.3g}"):
        cell = lambda v: "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))  # noqa: E731
        rows.append(f"| {name} | {cell(ref)} | {cell(ours)} | {'-' if ratio is None else f'{ratio:.2f}x'} | {note} |")

    s = r["settings"]
    if "generation" in r:
        g = r["generation"]
        ref, ours, fast = g["reference"], g["ours"], g["fast_sampler"]
        row("generation, images/s", ref["images_per_s"], ours["images_per_s"], g["ratio"],
            f"PNDM {s['steps']} steps, strength {s['strength']}, guidance {s['guidance']}; "
            f"ours {ours['images_per_call']} images per call")
        row("generation, model FLOPs utilisation", f"{100 * ref['mfu']:.1f} %", f"{100 * ours['mfu']:.1f} %", None,
            f"{g['flops']['total_tflop']:.3g} TFLOP per image ({g['flops']['unet_calls_per_image']} UNet passes)")
        gb = lambda v: None if v is None else f"{v:.1f} GB"  # noqa: E731
        row("generation, peak GPU memory", gb(ref["peak_memory_gb"]), gb(ours["peak_memory_gb"]), None,
            "torch.cuda.max_memory_allocated")
        d = g["same_seed_difference"]
        row("same seed, reference vs ours", None, f"{d['mean_abs_pixel']:.2g} / {d['max_abs_pixel']:.0f}", None,
            "mean / max abs pixel difference (0-255), image 0 of each source")
        f = fast["difference_vs_pndm"]
        row(f"DIFFERENT SETTING: DPM-Solver++ {s['fast_steps']} steps, images/s", None, fast["images_per_s"],
            fast["speedup_vs_ours"], f"vs ours PNDM; differs by {f['mean_abs_pixel']:.2g} px, "
            f"{f['mean_colour']:.2g} mean colour, {f['mean_abs_ita']:.2g} deg ITA")
    if "ti" in r:
        t = r["ti"]
        row("TI step, images/s", t["reference"]["images_per_s"], t["ours"]["images_per_s"], t["ratio_per_update"],
            f"reference 1 token x {t['reference']['images_per_update']}, ours 7 tokens per update")
        row("TI, 7 tokens end to end, images/s", t["end_to_end_images_per_s"]["reference"],
            t["end_to_end_images_per_s"]["ours"], t["ratio"], "paper's 500 updates; 7 model loads vs 1")
    if "lora" in r:
        lo = r["lora"]
        row("LoRA step, images/s", lo["reference"]["images_per_s"], lo["ours"]["images_per_s"], lo["ratio"],
            f"batch {s['train_batch']}")
    if "classifiers" in r:
        c = r["classifiers"]
        for arch, rate in c["archs"].items():
            ref = min(rate["train_images_per_s"], REFERENCE_LOADER_WORKERS / c["decode_s_per_image"]["real_jpeg"])
            row(f"classifier {arch}, images/s", ref, rate["train_images_per_s"], rate["train_images_per_s"] / ref,
                f"batch {s['classifier_batch']}, {s['classifier_crop']} px; reference: estimate, decoding on "
                f"{REFERENCE_LOADER_WORKERS} cores")
    if "study_hours" in r:
        h = r["study_hours"]
        row("whole paper study, GPU-hours", h["reference"]["total"], h["ours"]["total"], h["ratio"],
            "estimate: " + ", ".join(f"{k} {h['reference'][k]:.3g}/{h['ours'][k]:.3g}"
                                     for k in ("ti", "lora", "generation", "classifiers")))
    return "\n".join([head, "", "| workload | reference | ours | ours / ref | what |", "|---|---|---|---|---|", *rows])

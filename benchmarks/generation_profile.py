"""Where our generation call's time goes on a GPU: the variants behind the bench's generation row.

    python benchmarks/generation_profile.py OUT_DIR            # a CUDA machine (2 minutes on an H200, 2026-11-30)
    python benchmarks/generation_profile.py OUT_DIR --tiny     # the tiny model on a CPU: only shows it runs

`skinaug bench` measured our batched img2img at 31 % of the card's bf16 matmul rate
(benchmarks/README.md, 2026-11-30), against 40 % for the anchor's plain batched pipeline. This
script times one `generate.synthesize` call of 64 images (the paper's sampler: PNDM 100 steps,
strength 0.5, guidance 2) built as the bench built ours on that day (fp16, channels_last, VAE
slicing), then the same call with one setting changed at a time. It also times the UNet alone at
the call's batch, in each precision and memory layout, so that the UNet's share of the call shows. Random SD 2.1-base weights, like the bench.
Each figure is printed and added to OUT_DIR/generation_profile.json as soon as it is measured, so
a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from skinaug import atomic, prompts
from skinaug.bench import speed
from skinaug.diffusion import generate, sd21

ROWS = 64  # the bench's batch on an H200 (generate.MAX_BATCH)


def _call_seconds(pipe, strategy, rows, images_dir, cfg, device) -> tuple[float, int]:
    """Seconds of one call (after a short warm-up call) and the UNet calls it made (both guidance halves in one)."""
    generate.synthesize(pipe, strategy, rows[:2], images_dir, replace(cfg, generate=replace(cfg.generate, steps=4)))
    with speed.counting_calls(pipe.unet) as calls:
        seconds = speed.timed(lambda: generate.synthesize(pipe, strategy, rows, images_dir, cfg), device)
    return seconds, calls[0]


def _unet_seconds(pipe, batch: int, latent: int, device) -> float:
    """One UNet forward at the call's batch (two latents per image: guidance), in the pipe's dtype and layout."""
    unet = pipe.unet
    x = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=unet.dtype)
    if next(unet.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.to(memory_format=torch.channels_last)
    text = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    t = torch.full((2 * batch,), 500, device=device)
    with torch.no_grad():
        return speed.timed(lambda: unet(x, t, text), device, iters=5, warmup=2)


def main(out_dir: str, tiny: bool) -> None:
    s = speed.TINY if tiny else speed.FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    rows_n = 4 if tiny else ROWS
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"card": speed.card_name(device), "versions": speed.versions(), "rows": rows_n, "variants": {}}

    def record(name: str, value: dict) -> None:
        result["variants"][name] = value
        atomic.write_json(out / "generation_profile.json", result)
        print(f"{name}: {json.dumps(value)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="skinaug-genprof-") as tmp:
        tmp = Path(tmp)
        base_dir = speed.build_base(tmp / "base", s, device)
        train, images_dir = speed.write_train_split(tmp / "split", s)
        cfg = speed.ours_config(None, s, device, base_dir)
        result["matmul"] = speed.matmul_rate(device, s)
        prompt = prompts.skin_prompt("psoriasis", 6, use_tokens=False)
        rows = speed.generation_rows(list(train.md5hash), rows_n, s.per_source, prompt)
        strategy = generate.strategy_of("img2img_vanilla")
        latent = s.resolution // 8
        flop = None
        variants = [  # (name, model settings, VAE slicing); the first was the bench's call until 2026-11-30
            ("fp16, channels_last, VAE slicing", {"channels_last": True, "mixed_precision": "fp16"}, True),
            ("fp16, contiguous, VAE slicing", {"channels_last": False, "mixed_precision": "fp16"}, True),
            ("fp16, contiguous, no VAE slicing", {"channels_last": False, "mixed_precision": "fp16"}, False),
            ("bf16, contiguous, no VAE slicing", {"channels_last": False, "mixed_precision": "bf16"}, False),
        ]
        for name, model, slicing in variants:
            c = replace(cfg, model=replace(cfg.model, **model))
            dtype = sd21.weight_dtype(c.model, device)
            pipe = generate.load_pipeline(base_dir, strategy, {}, {}, c, device, dtype)
            if not slicing:
                pipe.vae.disable_slicing()
            start = time.perf_counter()
            seconds, calls = _call_seconds(pipe, strategy, rows, images_dir, c, device)
            if flop is None:
                flop = speed.image_flops(pipe, s.resolution, s.per_source, calls, s.guidance)
                result["flops"] = flop
            unet_s = _unet_seconds(pipe, rows_n, latent, device)
            images_per_s = rows_n / seconds
            record(name, {
                "dtype": str(dtype), "channels_last": c.model.channels_last, "vae_slicing": slicing,
                "images_per_s": images_per_s,
                "mfu": images_per_s * flop["total_tflop"] * 1e12 / result["matmul"]["flop_per_s"],
                "call_s": seconds, "unet_calls": calls, "unet_forward_s": unet_s,
                "unet_share_of_call": calls * unet_s / seconds,
                "unet_mfu": 2 * rows_n * flop["unet_tflop"] / flop["unet_calls_per_image"] * 1e12 / unet_s
                / result["matmul"]["flop_per_s"],
                "wall_s": time.perf_counter() - start})
            del pipe
            speed.release()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--tiny"):
        sys.exit("usage: python benchmarks/generation_profile.py OUT_DIR [--tiny]")
    main(sys.argv[1], len(sys.argv) == 3)

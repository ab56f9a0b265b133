"""Textual Inversion, then LoRA: the two fine-tuning stages of the generator (SPEC §3).

    skinaug textual_inversion data/splits/scenario1/seed0 data/images models/base models/scenario1/seed0/ti \
        --seed 0 --live-dir dvclive/scenario1/seed0/ti
    skinaug lora data/splits/scenario1/seed0 data/images models/base models/scenario1/seed0/lora \
        --ti-dir models/scenario1/seed0/ti --seed 0 --live-dir dvclive/scenario1/seed0/lora

Outputs (built in a hidden `.{out}.partial` folder beside out_dir with the checkpoints, renamed into
place only when complete: resume.Work; stock diffusers loaders read them):
    ti/<bas-class>.safetensors ... one {token: [1, hidden]} file per label -> pipe.load_textual_inversion
    ti/ti.json                     settings, steps and final loss per token (no timing: identical
                                   runs give identical outputs; the time is printed)
    lora/pytorch_lora_weights.safetensors          (mode joint)     -> pipe.load_lora_weights(lora)
    lora/<bas-class>/pytorch_lora_weights.safetensors (mode per_label, one folder per label)
    lora/lora.json                 settings, files and final loss
With live_dir, the loss curve goes to a DVCLive folder as it trains (skinaug.live): textual
inversion a row per textual_inversion.log_every updates, loss/<token name> the mean of each
token's losses over them; LoRA the same per lora.log_every, loss/joint or loss/<token name> (per_label).
A resumed run replays the checkpoint's losses there, so its curve is an uninterrupted run's.

Demo profile (tiny model, 1,519 images; textual_inversion.steps 100, lora.steps 200; 2 CPU cores): minutes per stage.

More than one GPU: `launch.processes: 4` (params) runs the same commands under accelerate (launch.py;
data parallel; the result of one process up to float rounding), as by hand would:
    accelerate launch --multi_gpu --num_processes 4 -m skinaug textual_inversion ...
Each process computes the loss of its share of every step's batch (`_mine`), normalised by the
whole batch; the trainable gradients are summed over processes (one all-reduce per step), so
every process applies the update a single process would. Only the main process writes.

Randomness is counter-based: every draw for sample i of step s of job j (a token, or a LoRA)
comes from generators seeded by (seed, phase, j, s, i). So the seven tokens can share one batch
and still get exactly the samples, noise and updates of seven separate runs, any process can
draw any sample, and a run resumed from a checkpoint needs only the step number to continue
as if never stopped.

Speed: VAE posteriors are computed on first use and kept whenever the augmentation leaves
the pixels fixed: for textual inversion (resize only) per image and flip state; for LoRA
(resize + random crop) for square images only, where the crop is a no-op (other images are
cropped and encoded every step). Sampling the latent from kept mean and std is the very draw
`vae.encode(...).latent_dist.sample()` makes, so this changes nothing but the time. LoRA
encodes each distinct prompt once (the text encoder is frozen). Attention uses PyTorch SDPA
(diffusers' default processor); channels_last is an option on GPU.

Over 300 lines for one idea, fine-tuning the generator on the training images: textual inversion
and LoRA share their data pipeline (cached posteriors, counter-seeded sampling, the accelerate
wiring and the all-reduce), which is most of this file; each phase's own code is a short
train_* function with helpers of its own (_token_run, _token_update, _save_tokens; _LoraRun, _lora_job).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from skinaug import SkinaugError, first_line, hashing, live, prompts, resume
from skinaug.config import Config, ModelConfig
from skinaug.data import trainset
from skinaug.diffusion import adapters, sd21, training

_ENCODE_BATCH = 16  # images per VAE call when caching posteriors
_LOSS_WINDOW = 10  # final loss = mean over the last this-many steps (one step's loss is noisy)
_TI, _LORA = 0, 1  # phase keys of the counter-based seeds
# textual_inversion.tokens_per_pass 0 on one GPU: tokens per pass from free memory. The one figure
# held: all 7 tokens x batch 4 in one pass, 512 px, bf16, peaked at 25.4 GB on an H200 (2026-11-30,
# benchmarks/README.md). Its split is assumed, not measured: about 4 GiB fixed (weights, the
# embedding's optimiser state), the rest 0.7 GiB per image of a pass; scales with pixels, x2 in fp32.
TI_FIXED_GIB = 4.0
TI_GIB_PER_IMAGE_512 = 0.7


# --- textual inversion -------------------------------------------------------------------


def train_textual_inversion(train_csv: Path, images_dir: Path, base_dir: Path, out_dir: Path, cfg: Config,
                            seed: int, *, labels: list[str] | None = None, checkpoint_every: int | None = None,
                            on_step=None, live_dir: Path | None = None) -> dict:
    """Learn one token per label, all in one job; each token's updates are those of a run of its own.

    `labels` trains a subset (the tests compare one token alone with the joint run);
    `on_step(step, losses, text_encoder)` is called after every optimiser update; live_dir: the
    loss curve (module docstring).
    """
    ti = cfg.textual_inversion
    labels = list(cfg.subset.labels if labels is None else labels)
    rows = _read_train(train_csv, images_dir, cfg.subset.labels, labels, need_every_label=True)
    run = _token_run(rows, labels, base_dir, cfg, seed)
    fingerprint = _fingerprint("textual_inversion", cfg, seed, train_csv, base_dir, labels=labels)
    names = [f"loss/{adapters.name(label)}" for label in labels]
    with (resume.Work(out_dir, fingerprint, run.accelerator) as work,  # waits while another run writes out_dir
          live.Curve(live_dir, run.accelerator.is_main_process) as curve):
        state = work.state
        start, history = (state["step"], state["history"]) if state else (0, [])
        curve.losses(history, ti.log_every, ti.steps, names, replay=True)
        if state:
            run.embeddings.weight.data[run.token_ids] = state["rows"].to(run.device)
            run.optimizer.load_state_dict(state["optimizer"])
        every = checkpoint_every or ti.checkpoint_every
        started = time.time()
        bar = tqdm(total=ti.steps, initial=start, desc="textual_inversion", unit="step",
                   disable=not run.accelerator.is_main_process)
        for step in range(start, ti.steps):
            step_losses = _token_update(run, step)
            history.append(step_losses.tolist())
            curve.losses(history, ti.log_every, ti.steps, names)
            bar.update()
            bar.set_postfix(loss=f"{step_losses.mean():.4f}")
            if every > 0 and (step + 1) % every == 0 and step + 1 < ti.steps:
                work.save({"step": step + 1, "history": history,
                           "rows": run.embeddings.weight.detach()[run.token_ids].cpu(),
                           "optimizer": run.optimizer.state_dict()})
            if on_step is not None:
                on_step(step + 1, dict(zip(labels, step_losses.tolist())), run.comps.text_encoder)
        bar.close()
        summary, final = _save_tokens(run, work.path, history, base_dir)
        work.finish()
    run.accelerator.print(f"textual_inversion: {len(labels)} tokens x {ti.steps} steps on {len(rows)} images in "
                          f"{time.time() - started:.0f} s, final loss {np.mean(final):.4f} -> {out_dir}")
    return summary


@dataclasses.dataclass
class _TokenRun:
    """One textual-inversion job as it trains: its labels, their images and samplers, the models,
    the embedding rows being learned (the other rows are kept at `original`) and their optimiser."""
    cfg: Config
    seed: int
    labels: list[str]
    comps: sd21.Components
    accelerator: object
    images: list
    posteriors: list
    samplers: list
    token_ids: list[int]
    embeddings: torch.nn.Embedding
    original: torch.Tensor
    keep: torch.Tensor
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    per_pass: int  # tokens per forward pass (tokens_per_pass)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _token_run(rows: pd.DataFrame, labels: list[str], base_dir: Path, cfg: Config, seed: int) -> _TokenRun:
    """Decode the images, add the tokens (token surgery) and set up accelerate and the optimiser."""
    ti = cfg.textual_inversion
    accelerator, dtype = _accelerator(cfg.model)
    device = accelerator.device
    per_pass = tokens_per_pass(cfg, accelerator, len(labels))  # before the models take their memory
    if per_pass < len(labels) and ti.tokens_per_pass == 0:
        accelerator.print(f"tokens per forward pass: {per_pass} of {len(labels)}, sized from free GPU memory "
                          "(textual_inversion.tokens_per_pass 0)")
    comps = sd21.load_components(base_dir)
    token_ids = _add_tokens(comps, [prompts.token(label) for label in labels], ti.init_token)
    comps.text_encoder.to(device)  # stays fp32: the trainable rows live in it
    _place(comps.unet, comps.vae, device=device, dtype=dtype, model=cfg.model)
    size = (cfg.model.resolution, cfg.model.resolution)  # bicubic resize to a square, no crop (the reference's)
    images = [[trainset.open_image(p).resize(size, Image.BICUBIC) for p in rows.path[rows.label == label]]
              for label in labels]  # decoded up front: a broken image fails before anything is written
    posteriors = [_Posteriors(comps.vae, lambda key, im=im: _flipped(im[key[0]], key[1])) for im in images]
    samplers = [_Shuffled(len(im), (seed, _TI, _key(cfg, label))) for label, im in zip(labels, images)]

    embeddings = comps.text_encoder.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    keep = torch.ones(len(original), dtype=torch.bool, device=device)
    keep[token_ids] = False
    lr = ti.lr * ti.batch_size * ti.grad_accum if ti.scale_lr else ti.lr
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=lr, weight_decay=ti.weight_decay)
    # Mixed precision, no DDP: below, only the new rows' gradient is summed over processes, once per step.
    text_encoder = accelerator.prepare_model(comps.text_encoder, evaluation_mode=True)
    optimizer = accelerator.prepare_optimizer(optimizer)
    return _TokenRun(cfg, seed, labels, comps, accelerator, images, posteriors, samplers, token_ids, embeddings,
                     original, keep, text_encoder, optimizer, lr, per_pass)


def tokens_per_pass(cfg: Config, accelerator, tokens: int) -> int:
    """Tokens per forward pass: textual_inversion.tokens_per_pass; when 0, all of them, except on a
    single GPU, where as many as free memory holds by TI_FIXED_GIB and TI_GIB_PER_IMAGE_512 (at least 1)."""
    ti = cfg.textual_inversion
    if ti.tokens_per_pass > 0:
        return min(ti.tokens_per_pass, tokens)
    device = accelerator.device
    if device.type != "cuda" or accelerator.num_processes > 1:  # several: each holds its share of a pass
        return tokens
    fits = sd21.fitting_in_free_memory(device, TI_GIB_PER_IMAGE_512 * ti.batch_size, cfg.model.resolution,
                                       accelerator.mixed_precision == "no", TI_FIXED_GIB)
    return max(1, min(tokens, fits))


def _token_update(run: _TokenRun, step: int) -> torch.Tensor:
    """One optimiser update of every token: the loss of each token's batch (in passes of
    textual_inversion.tokens_per_pass tokens, this process's share of each), the new rows'
    gradient summed over processes, the step, and every other row put back. Returns the
    tokens' losses (CPU)."""
    ti, labels, device = run.cfg.textual_inversion, run.labels, run.device
    per_pass = run.per_pass  # fewer per forward pass: less memory, same result
    passes = [list(range(len(labels)))[i : i + per_pass] for i in range(0, len(labels), per_pass)]
    step_losses = torch.zeros(len(labels), device=device)
    for micro, group in itertools.product(range(ti.grad_accum), passes):
        mine = _mine(len(group) * ti.batch_size, run.accelerator)  # this pass's samples, token after token
        if not mine:
            continue
        shares = [[j % ti.batch_size for j in mine if j // ti.batch_size == n] for n in range(len(group))]
        draws = [_ti_draws(run.comps, run.posteriors[k], run.samplers[k], labels[k],
                           (run.seed, _TI, _key(run.cfg, labels[k])), step * ti.grad_accum + micro, share, ti, device)
                 for k, share in zip(group, shares) if share]
        latents, noise, timesteps = (torch.cat([d[i] for d in draws]) for i in range(3))
        context = training.encode_prompts(run.comps.tokenizer, run.text_encoder, [p for d in draws for p in d[3]])
        losses = training.denoising_loss_per_image(run.comps.unet, run.comps.noise_scheduler, latents, context,
                                                   noise, timesteps)
        # A sum of per-token means, not one mean; each over the token's whole batch, whichever process has it.
        per_token = torch.stack([part.sum() for part in losses.split([len(s) for s in shares])]) / ti.batch_size
        run.accelerator.backward(per_token.sum() / ti.grad_accum)
        step_losses[group] += per_token.detach().float() / ti.grad_accum
    if run.accelerator.num_processes > 1:
        grad = _grad(run.embeddings.weight)
        new_rows = grad[run.token_ids]
        _sum_over_processes(run.accelerator, [new_rows, step_losses])
        grad.zero_()  # the other rows are restored below; zeroed, every process steps on the same gradient
        grad[run.token_ids] = new_rows
    step_losses = step_losses.cpu()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # only the new rows learn; weight decay touched every row
        run.embeddings.weight[run.keep] = run.original[run.keep]
    return step_losses


def _save_tokens(run: _TokenRun, folder: Path, history: list, base_dir: Path) -> tuple[dict, list]:
    """Write each label's learned token and ti.json into folder (main process); returns the summary
    and the final losses."""
    from safetensors.torch import save_file

    ti, labels = run.cfg.textual_inversion, run.labels
    learned = run.embeddings.weight.detach()[run.token_ids].float().cpu()
    final = np.mean(history[-_LOSS_WINDOW:], axis=0) if history else [float("nan")] * len(labels)
    summary = {
        "stage": "textual_inversion", "seed": run.seed, "base": sd21.base_info(base_dir),
        "steps": ti.steps, "lr": run.lr, "effective_batch_per_token": ti.batch_size * ti.grad_accum,
        "final_loss_window": _LOSS_WINDOW,
        "resolution": run.cfg.model.resolution, "mixed_precision": run.accelerator.mixed_precision,
        "settings": dataclasses.asdict(ti), "tokens": {},
    }
    for i, label in enumerate(labels):
        token = prompts.token(label)
        if run.accelerator.is_main_process:
            save_file({token: learned[i : i + 1].contiguous()}, folder / adapters.token_file(label))
        summary["tokens"][label] = {"token": token, "file": adapters.token_file(label), "images": len(run.images[i]),
                                    "final_loss": float(final[i])}
    if run.accelerator.is_main_process:
        (folder / "ti.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, final


def _ti_draws(comps, posteriors, sampler, label, key, micro_step, share, ti, device):
    """Samples `share` of one token's batch: images (flipped or not), latents, noise, timesteps, prompts."""
    gens = [_generators((*key, micro_step, i), device) for i in share]
    index = [int(sampler.take(micro_step * ti.batch_size + i, 1)[0]) for i in share]
    flip = [bool(torch.rand(1, generator=host) < ti.flip_p) for host, _ in gens]
    templates = [int(torch.randint(len(prompts.TI_TEMPLATES[ti.templates]), (1,), generator=host)) for host, _ in gens]
    latents, noise, timesteps = _noised(comps.vae, comps.noise_scheduler, *posteriors.get(list(zip(index, flip))),
                                        [dev for _, dev in gens])
    return latents, noise, timesteps, [prompts.ti_prompt(label, t, ti.templates) for t in templates]


def _add_tokens(comps, tokens: list[str], init_token: str) -> list[int]:
    """Add the new tokens to tokenizer and text encoder, each row a copy of init_token's."""
    init_ids = comps.tokenizer.encode(init_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise SkinaugError(f"textual_inversion.init_token {init_token!r} is {len(init_ids)} tokens; it must be one")
    if comps.tokenizer.add_tokens(tokens) != len(tokens):
        raise SkinaugError(f"the base model's tokenizer already holds one of {', '.join(tokens)}")
    comps.text_encoder.resize_token_embeddings(len(comps.tokenizer), mean_resizing=False)
    ids = comps.tokenizer.convert_tokens_to_ids(tokens)
    weight = comps.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    return ids


def train_lora(train_csv: Path, images_dir: Path, base_dir: Path, ti_dir: Path | None, out_dir: Path, cfg: Config,
               seed: int, *, checkpoint_every: int | None = None, on_step=None, live_dir: Path | None = None) -> dict:
    """Fine-tune the UNet with LoRA (text encoder frozen): one joint LoRA, or one per label.

    Prompts name the learned tokens from ti_dir; without ti_dir (or with lora.use_tokens
    false) they name the condition in plain words (the ablation's "img2img LoRA").
    """
    lo = cfg.lora
    labels = list(cfg.subset.labels)
    rows = _read_train(train_csv, images_dir, labels, labels, need_every_label=lo.mode == "per_label")
    use_tokens = ti_dir is not None and lo.use_tokens
    accelerator, dtype = _accelerator(cfg.model)
    device = accelerator.device
    comps = sd21.load_components(base_dir)
    if use_tokens:
        _load_tokens(comps, base_dir, ti_dir, labels)
    _place(comps.unet, comps.vae, comps.text_encoder, device=device, dtype=dtype, model=cfg.model)
    context, prompt_of_row = _prompt_cache(comps, [prompts.skin_prompt(label, fst, use_tokens)
                                                   for label, fst in zip(rows.label, rows.fitzpatrick_scale)])
    images = _CroppedImages(comps.vae, rows.path, cfg.model.resolution)
    # Mixed precision, no DDP: adapters come and go per job; _lora_job sums their gradients itself.
    run = _LoraRun(accelerator, accelerator.prepare_model(comps.unet, evaluation_mode=True), comps.noise_scheduler,
                   images, context, prompt_of_row, lo, dtype)
    if lo.mode == "joint":
        jobs = [(None, np.arange(len(rows)))]
    else:
        jobs = [(label, np.flatnonzero(rows.label.to_numpy() == label)) for label in labels]

    fingerprint = _fingerprint("lora", cfg, seed, train_csv, base_dir, labels=labels,
                               ti=sorted(hashing.file_digest(f) for f in adapters.token_files(ti_dir, labels)[0]) if use_tokens
                               else None)
    with (resume.Work(out_dir, fingerprint, accelerator) as work,  # waits while another run writes out_dir
          live.Curve(live_dir, accelerator.is_main_process) as curve):
        state = work.state or {"job": 0, "done": {}, "curves": {}}
        for name, losses in state["curves"].items():  # the LoRAs finished before a kill
            curve.losses(losses, lo.log_every, lo.steps, [_loss_name(name)], replay=True)
        every = checkpoint_every or lo.checkpoint_every
        started = time.time()
        bar = tqdm(total=lo.steps * len(jobs), initial=lo.steps * state["job"] + state.get("step", 0), desc="lora",
                   unit="step", disable=not accelerator.is_main_process)
        for j, (label, members) in enumerate(jobs):
            if j < state["job"]:
                continue
            name = adapters.JOINT if label is None else label
            sampler = (_Shuffled(len(members), (seed, _LORA, j)) if label is None
                       else _Balanced(rows.fitzpatrick_scale.to_numpy()[members]))

            def checkpoint(step, history, optimizer, params, j=j):
                if every > 0 and step % every == 0 and step < lo.steps:
                    work.save({"job": j, "done": state["done"], "curves": state["curves"], "step": step,
                               "history": history,
                               "optimizer": optimizer.state_dict(),
                               "lora": {n: p.detach().cpu() for n, p in params.items()}})

            def log(history, replay=False, name=name):
                curve.losses(history, lo.log_every, lo.steps, [_loss_name(name)], replay)

            history = _lora_job(run, members, sampler, (seed, _LORA, j), state if state.get("step") else None,
                                checkpoint, log, bar, on_step)
            weights = adapters.lora_file(work.path, adapters.JOINT if label is None else adapters.name(label))
            if accelerator.is_main_process:
                _save_lora(accelerator.unwrap_model(run.unet), weights.parent)
            state = {"job": j + 1, "done": {**state["done"], name: {
                "file": str(weights.relative_to(work.path)), "images": len(members),
                "final_loss": float(np.mean(history[-_LOSS_WINDOW:])) if history else float("nan")}},
                "curves": {**state["curves"], name: history}}
            work.save(state)
        bar.close()

        summary = {
            "stage": "lora", "seed": seed, "base": sd21.base_info(base_dir), "mode": lo.mode,
            "tokens": use_tokens, "ti_dir": str(ti_dir) if use_tokens else None, "steps": lo.steps,
            "resolution": cfg.model.resolution, "mixed_precision": accelerator.mixed_precision,
            "final_loss_window": _LOSS_WINDOW,
            "latents_kept": f"{images.cached} of {len(rows)} images (square: the crop is a no-op)",
            "settings": dataclasses.asdict(lo), "loras": state["done"],
        }
        if accelerator.is_main_process:
            (work.path / "lora.json").write_text(json.dumps(summary, indent=2) + "\n")
        work.finish()
    losses = [v["final_loss"] for v in state["done"].values()]
    accelerator.print(f"lora: {len(jobs)} LoRA(s) ({lo.mode}) x {lo.steps} steps on {len(rows)} images in "
                      f"{time.time() - started:.0f} s, final loss {np.mean(losses):.4f} -> {out_dir}")
    return summary


@dataclasses.dataclass
class _LoraRun:
    """What every LoRA of one run shares: the model, the kept images and prompts, the settings."""

    accelerator: object
    unet: torch.nn.Module  # prepared by the accelerator
    noise_scheduler: object
    images: _CroppedImages
    context: torch.Tensor  # text-encoder states of each distinct prompt
    prompt_of_row: np.ndarray  # train row -> its prompt's index in context
    lo: object  # config.LoraConfig
    dtype: torch.dtype  # weight dtype of the frozen modules


def _lora_job(run: _LoraRun, members: np.ndarray, sampler, key: tuple, resume: dict | None, checkpoint, log, bar,
              on_step) -> list[float]:
    """Add a fresh adapter and train it for lora.steps updates (from a checkpoint when resuming).

    log(history, replay=False) logs the loss curve's row due (replay: the checkpoint's rows)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    lo, accelerator = run.lo, run.accelerator
    base = accelerator.unwrap_model(run.unet)
    if "default" in getattr(base, "peft_config", {}):
        base.delete_adapters("default")
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(_seed_of(*key))  # the adapter's Gaussian init
        base.add_adapter(LoraConfig(r=lo.rank, lora_alpha=lo.alpha, init_lora_weights="gaussian",
                                    target_modules=list(lo.targets)))
    if run.dtype != torch.float32:
        cast_training_params(base, dtype=torch.float32)  # trainable weights in fp32 under autocast
    params = {name: p for name, p in base.named_parameters() if p.requires_grad}
    optimizer = accelerator.prepare(torch.optim.AdamW(params.values(), lr=lo.lr,
                                                      weight_decay=lo.weight_decay))
    start, history = 0, []
    if resume is not None:
        with torch.no_grad():
            for name, value in resume["lora"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(resume["optimizer"])
        start, history = resume["step"], resume["history"]
    log(history, replay=True)
    for step in range(start, lo.steps):
        loss = torch.zeros((), device=accelerator.device)
        mine = _mine(lo.batch_size, accelerator)
        gens = [_generators((*key, step, i), accelerator.device) for i in mine]
        if mine:
            rows = members[[int(sampler.take(step * lo.batch_size + i, 1, host)[0])
                            for i, (host, _) in zip(mine, gens)]]
            latents, noise, timesteps = _noised(run.images.vae, run.noise_scheduler,
                                                *run.images.moments(rows, [host for host, _ in gens]),
                                                [dev for _, dev in gens])
            losses = training.denoising_loss_per_image(run.unet, run.noise_scheduler, latents,
                                                run.context[run.prompt_of_row[rows]], noise, timesteps)
            loss = losses.sum() / lo.batch_size  # over the whole batch: the processes' gradients add up to it
            accelerator.backward(loss)
        if accelerator.num_processes > 1:
            loss = loss.detach().clone()
            _sum_over_processes(accelerator, [_grad(p) for p in params.values()] + [loss])
        if lo.max_grad_norm > 0:  # 0: no clipping, as the reference's script runs (its clip sees no parameters)
            accelerator.clip_grad_norm_(list(params.values()), lo.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        log(history)
        bar.update()
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        checkpoint(step + 1, history, optimizer, params)
        if on_step is not None:
            on_step(step + 1, {"loss": history[-1]}, base)
    return history


def _loss_name(job: str) -> str:
    """A LoRA's loss curve in DVCLive: loss/joint, or loss/<token name> for a label's own LoRA."""
    return f"loss/{job if job == adapters.JOINT else adapters.name(job)}"


def _save_lora(unet, folder: Path) -> None:
    """The diffusers LoRA format, as StableDiffusionPipeline.load_lora_weights(folder) reads it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    adapter = unet.peft_config["default"].to_dict()
    adapter["target_modules"] = sorted(adapter["target_modules"])  # a set in peft: listed in hash order
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=adapter)
    _sort_metadata(folder / adapters.LORA_FILE)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its __metadata__ keys sorted, in place.

    safetensors (0.8) writes them in hash-map order, which changes from run to run: two identical
    LoRAs would differ in bytes, so in DVC's hash and in every manifest's lora_sha256. Reordering
    the keys of the compact JSON header keeps its length, the offsets and the tensors.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise SkinaugError(f"cannot reorder the header of {path}: it would grow")
        f.seek(8)
        f.write(text.ljust(size))


def _load_tokens(comps, base_dir: Path, ti_dir: Path, labels: list[str]) -> None:
    """Learned tokens into tokenizer and text encoder through diffusers' own loader, once they fit the base."""
    from diffusers import StableDiffusionPipeline

    files, tokens = adapters.token_files(ti_dir, labels)
    adapters.check_token_files(base_dir, files)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=comps.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    try:
        pipe.load_textual_inversion([str(f) for f in files], token=tokens)
    except (OSError, ValueError) as e:
        raise SkinaugError(f"cannot load learned tokens from {ti_dir}: {first_line(e)}") from None


@torch.no_grad()
def _prompt_cache(comps, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Encode each distinct prompt once (the text encoder is frozen): states and row -> prompt index."""
    unique = sorted(set(texts))
    states = torch.cat([training.encode_prompts(comps.tokenizer, comps.text_encoder, unique[i : i + _ENCODE_BATCH])
                        for i in range(0, len(unique), _ENCODE_BATCH)])
    position = {text: i for i, text in enumerate(unique)}
    return states, np.array([position[t] for t in texts])


# --- images and latents ---------------------------------------------------------------------


def _read_train(train_csv: Path, images_dir: Path, known: list[str], labels: list[str],
                need_every_label: bool) -> pd.DataFrame:
    """The train split's rows for `labels`, with image paths; every image must exist."""
    df = trainset.read(train_csv)
    unknown = sorted(set(df.label) - set(known))
    if unknown:
        raise SkinaugError(f"{train_csv} has label(s) not in subset.labels: {', '.join(unknown)}")
    df = df[df.label.isin(labels)].reset_index(drop=True)
    empty = [label for label in labels if not (df.label == label).any()]
    if df.empty or (need_every_label and empty):
        raise SkinaugError(f"{train_csv} has no training images for {', '.join(empty) or 'any label'}")
    df["path"] = [Path(images_dir) / f"{md5}.jpg" for md5 in df.md5hash]
    missing = [p for p in df.path if not p.is_file()]
    if missing:
        raise SkinaugError(f"{len(missing)} of {len(df)} images listed in {train_csv} are missing "
                           f"(first: {missing[0]})")
    return df


def _to_pixels(arrays) -> torch.Tensor:
    """uint8 HxWx3 arrays -> a batch in [-1, 1], as both reference scripts scale."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _flipped(image, flip: bool) -> np.ndarray:
    """Resized, then flipped: the reference's order."""
    array = np.asarray(image)
    return array[:, ::-1] if flip else array


class _Posteriors:
    """VAE posterior moments of fixed images, encoded on first use and kept.

    Sampling a latent from kept moments is the very draw vae.encode(...).latent_dist.sample()
    makes, so reuse is exact; encoding on first use means never more VAE calls than encoding
    every step (a short run, like the demo's, touches fewer images than the split holds).
    """

    def __init__(self, vae, pixels_of):
        self.vae, self.pixels_of, self.kept = vae, pixels_of, {}

    def get(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        new = [k for k in dict.fromkeys(keys) if k not in self.kept]
        for i in range(0, len(new), _ENCODE_BATCH):
            chunk = new[i : i + _ENCODE_BATCH]
            self.kept.update(zip(chunk, zip(*_moments(self.vae, [self.pixels_of(k) for k in chunk]))))
        return tuple(torch.stack([self.kept[k][j] for k in keys]) for j in (0, 1))


@torch.no_grad()
def _moments(vae, arrays) -> tuple[torch.Tensor, torch.Tensor]:
    return training.latent_moments(vae, _to_pixels(arrays).to(vae.device))


class _CroppedImages:
    """LoRA's images: bilinear resize of the shorter side to `resolution`, then a random square crop.

    A square image crops to itself, so its posterior is kept (exact); the others are kept
    resized in memory, and cropped and encoded every step (a crop in latent space would not
    be equivalent).
    """

    def __init__(self, vae, paths, resolution: int):
        self.vae, self.resolution = vae, resolution
        self.pixels = [self._resize(trainset.open_image(path)) for path in paths]  # a broken image fails here
        self.square = _Posteriors(vae, lambda i: self.pixels[i])
        self.cached = sum(a.shape[0] == a.shape[1] for a in self.pixels)

    def _resize(self, image) -> np.ndarray:
        w, h = image.size  # torchvision Resize(int): shorter side -> resolution, longer truncated
        size = (self.resolution, int(self.resolution * h / w)) if w <= h else (int(self.resolution * w / h),
                                                                                self.resolution)
        return np.asarray(image.resize(size, Image.BILINEAR))

    def moments(self, rows, hosts: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of each row's crop; a row's crop is drawn from its own generator."""
        crops = {}
        for n, (i, host) in enumerate(zip(rows, hosts)):
            h, w = self.pixels[i].shape[:2]
            if h != w:
                top = int(torch.randint(h - self.resolution + 1, (1,), generator=host))
                left = int(torch.randint(w - self.resolution + 1, (1,), generator=host))
                crops[n] = self.pixels[i][top : top + self.resolution, left : left + self.resolution]
        fresh = iter(zip(*_moments(self.vae, list(crops.values())))) if crops else iter(())
        square = [i for n, i in enumerate(rows) if n not in crops]
        kept = iter(zip(*self.square.get(square))) if square else iter(())
        moments = [next(fresh) if n in crops else next(kept) for n in range(len(rows))]
        return tuple(torch.stack([m[j] for m in moments]) for j in (0, 1))


# --- sampling and randomness ------------------------------------------------------------------


def _noised(vae, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, generators: list) -> tuple:
    """Latents, noise and timesteps, each sample's drawn from its own device generator."""
    drawn = []
    for m, s, generator in zip(mean, std, generators):
        latent = training.sample_latents(vae, m[None], s[None], generator)
        drawn.append((latent, *training.sample_noise(noise_scheduler, latent, generator)))
    return tuple(torch.cat(parts) for parts in zip(*drawn))


def _seed_of(*key: int) -> int:
    """A 63-bit seed that is a pure function of the key (seed, phase, job, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _generators(key: tuple, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A CPU generator (which images, flips, templates, crops) and one on the device (latents, noise,
    timesteps), both fixed by the key so that any step can be redrawn without replaying the ones before."""
    host = torch.Generator().manual_seed(_seed_of(*key, 0))
    return host, torch.Generator(device).manual_seed(_seed_of(*key, 1))


class _Shuffled:
    """Endless reshuffled passes over n items (a shuffling DataLoader), a pure function of the position."""

    def __init__(self, n: int, key: tuple):
        self.n, self.key, self._epoch, self._perm = n, key, None, None

    def take(self, start: int, count: int, generator=None) -> np.ndarray:  # noqa: ARG002 - as _Balanced
        out = []
        for position in range(start, start + count):
            epoch, i = divmod(position, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(_seed_of(*self.key, epoch, 2))
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).numpy()
            out.append(self._perm[i])
        return np.array(out)


class _Balanced:
    """Skin-type-balanced sampling: a fitzpatrick_scale uniformly among those present, then one of its images."""

    def __init__(self, fitzpatrick_scale: np.ndarray):
        self.fst = np.asarray(fitzpatrick_scale)

    def take(self, start: int, count: int, generator: torch.Generator) -> np.ndarray:  # noqa: ARG002 - as _Shuffled
        return balanced_indices(self.fst, count, generator)


def balanced_indices(fitzpatrick_scale: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """`count` row indices whose skin types are uniform over the types present (with replacement)."""
    fst = np.asarray(fitzpatrick_scale)
    types = np.unique(fst)
    picked = types[torch.randint(len(types), (count,), generator=generator).numpy()]
    out = []
    for t in picked:
        members = np.flatnonzero(fst == t)
        out.append(members[int(torch.randint(len(members), (1,), generator=generator))])
    return np.array(out)


def _key(cfg: Config, label: str) -> int:
    """A token's job key: its place in subset.labels, the same whether trained alone or with the others."""
    return cfg.subset.labels.index(label)


# --- device, precision, resume ------------------------------------------------------------------


def _accelerator(model: ModelConfig):
    """accelerate's Accelerator for device placement, mixed precision (fp32 on CPU) and processes."""
    from accelerate import Accelerator

    device = sd21.pick_device(model.device)
    dtype = sd21.weight_dtype(model, device)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision), dtype


def _mine(count: int, accelerator) -> range:
    """The samples (of a batch of `count`) this process computes: a contiguous share, sizes within one."""
    n, i = accelerator.num_processes, accelerator.process_index
    return range(i * count // n, (i + 1) * count // n)


def _grad(param: torch.Tensor) -> torch.Tensor:
    """param.grad, zero when this process had no sample this step (its share of the sum is nothing)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def _sum_over_processes(accelerator, tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place, in one all-reduce."""
    flat = accelerator.reduce(torch.cat([t.detach().reshape(-1).float() for t in tensors]), reduction="sum")
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _place(*modules, device, dtype, model: ModelConfig) -> None:
    """Frozen modules to the device in the weight dtype; channels_last on GPU when params ask for it."""
    channels_last = device.type == "cuda" and model.channels_last
    for module in modules:
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
        if channels_last and module.__class__.__name__ != "CLIPTextModel":
            module.to(memory_format=torch.channels_last)


def _fingerprint(stage: str, cfg: Config, seed: int, train_csv: Path, base_dir: Path, **extra) -> dict:
    """What a checkpoint must match to be resumed: settings, seed, split and base model."""
    section = cfg.textual_inversion if stage == "textual_inversion" else cfg.lora
    model = dataclasses.asdict(cfg.model) | {"device": cfg.model.device.split(":")[0]}  # any card resumes it
    return {"stage": stage, "seed": seed, "settings": dataclasses.asdict(section),
            "model": model, "train_csv": hashing.file_digest(train_csv),
            "base": sd21.base_info(base_dir), **extra}

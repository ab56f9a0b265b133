"""Synthetic images (SPEC §4, §6): img2img from every training image, resumable, one manifest.

    skinaug generate data/splits/scenario1/seed0 data/images models/base data/synthetic/scenario1/seed0 \\
        --ti-dir models/scenario1/seed0/ti --lora-dir models/scenario1/seed0/lora --seed 0
    dvc exp run -S launch.processes=4    # the same run on 4 GPUs: the stage relaunches under accelerate (launch.py)

The plan (one row per synthetic image: source, target skin type, prompt, seed) is a pure
function of (train.csv, params, seed, strategy). Each image is fixed by its row alone: its own
CPU torch.Generator feeds both the VAE posterior sample and the img2img noise (diffusers draws
generator[i] for batch element i), so batch size and process count change it by floating-point
noise at most. Batches are fixed chunks of the plan and process p makes batches
p, p+n, p+2n..., so n processes compute exactly what one process computes. Images are written
atomically; a rerun makes only the batches that miss an image, each whole (so every image comes
from its usual batch: a resumed run's images are an uninterrupted run's, on a GPU too) but writes
only the missing ones, and process 0 writes manifest.csv last, after checking every planned file
exists. A second run on the same out_dir (another `dvc exp` worker) waits for the first
(atomic.locked), so neither deletes the other's files.

One module, over 300 lines, for one idea: a resumable, deterministic run of one plan; the strategies
are rows of diffusion/strategies.py, the adapters' files diffusion/adapters.py's.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from skinaug import SkinaugError, atomic, first_line, hashing, prompts
from skinaug.config import Config
from skinaug.data import trainset
from skinaug.diffusion import adapters, sd21
from skinaug.diffusion.strategies import STRATEGIES, Strategy

PLAN_COLUMNS = ["file", "source_md5hash", "label", "fitzpatrick_scale", "source_fitzpatrick_scale", "prompt",
                "seed", "strength", "guidance", "steps", "strategy"]
MANIFEST_COLUMNS = PLAN_COLUMNS + ["base", "base_revision", "ti_sha256", "lora_sha256"]
STATE_FILE = ".plan.json"  # fingerprint of the run the images in out_dir/images belong to
CPU_BATCH = 8  # batch_size 0 on CPU: larger batches buy nothing there
MAX_BATCH = 64  # cap of the automatic GPU batch size
# Automatic GPU batch: an estimate of the memory one more image in a call needs at 512 px in half
# precision with SDPA: the UNet runs two latents per image (guidance); the VAE decodes one image at
# a time (slicing). Scales with pixels; doubled in fp32. Generous: on an H200 (2026-11-30) a call
# of 64 peaked at 11.4 GB with the weights, about 0.13 GiB per image beyond them
# (benchmarks/README.md), so a 24 GB card gets a batch of about 27 where 64 would fit.
GIB_PER_IMAGE_512 = 0.75


def strategy_of(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SkinaugError(f"unknown generation strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def image_seed(seed: int, md5hash: str, k: int) -> int:
    """Seed of one synthetic image: a stable 63-bit hash of (split seed, source, index)."""
    digest = hashlib.sha256(f"{seed}:{md5hash}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_plan(train_csv: Path, cfg: Config, seed: int, strategy: str, sources_per_label: int = 0) -> pd.DataFrame:
    """One row per synthetic image, in train.csv order then k (pure: same inputs, same plan).

    Target skin type: a light source gets one of splits.dark, drawn by numpy default_rng(seed) in
    source-row order, once per source (generate.target_per "source", as the authors draw it: all
    images of a source share it) or once per image ("image", in (source row, k) order); any other
    source keeps its own. sources_per_label > 0 keeps only the first that many sources of each
    label (a smaller ablation). generate.max_per_label > 0 then keeps at most that many images
    of each label: every source's k-th image before any source's (k+1)-th, sources within a k in
    the order of their image seeds (a seeded draw that the cap does not change for kept rows).
    """
    s, g = strategy_of(strategy), cfg.generate
    train = _read_train(train_csv)
    if sources_per_label > 0:
        train = train.groupby("label", sort=False, group_keys=False).head(sources_per_label)
    draws = target_draws(np.random.default_rng(seed), cfg.splits.dark, len(train), g.per_source, g.target_per)
    rows = []
    for i, src in enumerate(train.itertuples(index=False)):
        own = int(src.fitzpatrick_scale)
        for k in range(g.per_source):
            fst = int(draws[i, k]) if own in cfg.splits.light else own
            rows.append([f"images/{src.md5hash}_{k}.png", src.md5hash, src.label, fst, own,
                         prompts.skin_prompt(src.label, fst, use_tokens=s.ti), image_seed(seed, src.md5hash, k),
                         g.strength if s.img2img else None, g.guidance, g.steps, strategy])
    plan = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    return cap_per_label(plan, g.per_source, g.max_per_label) if g.max_per_label > 0 else plan


def cap_per_label(plan: pd.DataFrame, per_source: int, cap: int) -> pd.DataFrame:
    """At most `cap` rows of each label, spread over sources (see make_plan), in plan order."""
    k = np.arange(len(plan)) % per_source  # rows are (source, k) in order
    rank = plan.assign(k=k).sort_values(["k", "seed"], kind="stable").groupby("label", sort=False).cumcount()
    return plan[rank.sort_index().to_numpy() < cap].reset_index(drop=True)


def target_draws(rng: np.random.Generator, dark: list[int], sources: int, per_source: int,
                 target_per: str) -> np.ndarray:
    """(sources, per_source) skin types drawn from `dark`: one per source repeated, or one per image."""
    if target_per == "source":
        return np.repeat(rng.choice(dark, size=(sources, 1)), per_source, axis=1)
    return rng.choice(dark, size=(sources, per_source))


def generate(train_csv: Path, images_dir: Path, base_dir: Path, out_dir: Path, cfg: Config, seed: int,
             ti_dir: Path | None = None, lora_dir: Path | list[Path] | None = None,
             strategy: str = "img2img_ti_lora", state=None, sources_per_label: int = 0) -> pd.DataFrame:
    """Write out_dir/images/{md5hash}_{k}.png and out_dir/manifest.csv; returns the manifest.

    lora_dir: one LoRA folder, or several (the ablation passes the token LoRA and the plain-name
    one): the strategy takes the one trained as it needs (`choose_lora`). Everything is checked
    before out_dir is touched. `state` (default: accelerate's PartialState) gives process_index,
    num_processes, is_main_process and wait_for_everyone().
    """
    start = time.perf_counter()
    s = strategy_of(strategy)
    for needed, given, option in ((s.ti, ti_dir, "--ti-dir"), (s.lora, lora_dir, "--lora-dir")):
        if needed and not given:
            raise SkinaugError(f"strategy {strategy} needs {option}")
    plan = make_plan(train_csv, cfg, seed, strategy, sources_per_label)
    tokens = tokens_for(plan, Path(ti_dir), base_dir) if s.ti else {}
    if s.lora:
        lora_dir = choose_lora(lora_dir if isinstance(lora_dir, list) else [lora_dir], strategy)
    loras = loras_for(plan, Path(lora_dir), cfg.lora.mode, base_dir) if s.lora else {}
    if s.img2img:
        _check_sources(plan, Path(images_dir))
    device = sd21.pick_device(cfg.model.device)
    if state is None:
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")  # cpu: gloo between CPU processes under a launcher
    if device.type == "cuda" and state.num_processes > 1:
        device = torch.device("cuda", state.local_process_index)
    dtype = sd21.weight_dtype(cfg.model, device)
    pipe = load_pipeline(base_dir, s, tokens, loras, cfg, device, dtype)
    info = sd21.base_info(base_dir)
    manifest = plan.assign(base=info["base"], base_revision=info["revision"],
                           ti_sha256=hashing.files_digest(list(tokens.values()), ti_dir),
                           lora_sha256=hashing.files_digest(list(loras.values()), lora_dir))

    out_dir = Path(out_dir)
    fingerprint = {"manifest": hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest(),
                   "resolution": cfg.model.resolution, "out_size": cfg.generate.out_size, "dtype": str(dtype)}
    with atomic.locked(out_dir, enabled=state.is_main_process):  # a second run on out_dir waits for this one
        missing = _prepare(out_dir, manifest, fingerprint, cfg.generate.out_size) if state.is_main_process else 0
        state.wait_for_everyone()

        size = batch_size(cfg, device, dtype)
        if cfg.generate.batch_size == 0 and device.type == "cuda" and state.num_processes > 1:
            from accelerate.utils import gather_object

            size = min(gather_object([size]))  # equal batches on every process (see the module docstring)
        per_label = s.lora and cfg.lora.mode == "per_label"
        mine = _batches(plan, size, per_label)[state.process_index::state.num_processes]
        # a batch cut short is made again whole, so that each image comes from the batch it always does
        todo = [batch for batch in mine if not all((out_dir / r["file"]).exists() for r in batch)]
        _run(pipe, s, todo, Path(images_dir) if s.img2img else None, out_dir, cfg, per_label, state.is_main_process)

        state.wait_for_everyone()
        if state.is_main_process:
            absent = [f for f in manifest.file if not (out_dir / f).exists()]
            if absent:
                raise SkinaugError(f"{len(absent)} planned images missing, first {out_dir / absent[0]}; "
                                   "rerun to finish")
            atomic.write_csv(out_dir / "manifest.csv", manifest)
            elapsed = time.perf_counter() - start
            print(f"generate: {len(manifest)} images ({missing} new) in {elapsed:.1f} s, "
                  f"{missing / elapsed:.2f} images/s -> {out_dir}")
    return manifest


def load_pipeline(base_dir: Path, s: Strategy, tokens: dict[str, Path], loras: dict[str, Path], cfg: Config,
                  device: torch.device, dtype: torch.dtype = torch.float32):
    """The base model's img2img (or txt2img) pipeline with its own scheduler and the adapters loaded."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    c = sd21.load_components(base_dir, device, dtype)
    cls = StableDiffusionImg2ImgPipeline if s.img2img else StableDiffusionPipeline
    pipe = cls.from_pretrained(  # reads only the scheduler: the base model's own (PNDM for SD 2.1 base)
        base_dir, tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, unet=c.unet,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # decode image by image: memory flat in batch size, same result
    where = ""
    try:
        if tokens:
            where = str(next(iter(tokens.values())).parent)
            pipe.load_textual_inversion([str(f) for f in tokens.values()], token=list(tokens))
        for name, file in loras.items():
            where = str(file)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # past the checks of tokens_for, loras_for
        raise SkinaugError(f"cannot load adapters from {where}: {first_line(e)}") from None
    if cfg.model.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.generate.compile:
        pipe.unet.compile()  # in place: the pipeline keeps its UNet2DConditionModel
    return pipe


def batch_size(cfg: Config, device: torch.device, dtype: torch.dtype) -> int:
    """generate.batch_size; when 0, CPU_BATCH on CPU and on GPU as many as free memory holds (capped)."""
    if cfg.generate.batch_size > 0:
        return cfg.generate.batch_size
    if device.type != "cuda":
        return CPU_BATCH
    fits = sd21.fitting_in_free_memory(device, GIB_PER_IMAGE_512, cfg.model.resolution, dtype == torch.float32)
    return max(1, min(MAX_BATCH, fits))


def _run(pipe, s: Strategy, todo: list[list[dict]], images_dir: Path | None, out_dir: Path, cfg: Config,
         per_label: bool, show: bool) -> None:
    from tqdm import tqdm

    missing = [[out_dir / r["file"] for r in rows if not (out_dir / r["file"]).exists()] for rows in todo]
    with tqdm(total=sum(map(len, missing)), unit="img", desc="generate", disable=not show) as bar:
        for rows, paths in zip(todo, missing):
            if per_label:
                pipe.set_adapters([adapters.name(rows[0]["label"])])
            for row, image in zip(rows, synthesize(pipe, s, rows, images_dir, cfg), strict=True):
                if out_dir / row["file"] in paths:  # the others were kept from an interrupted run
                    _save_png(out_dir / row["file"], image, cfg.generate.out_size)
            bar.update(len(paths))


def synthesize(pipe, s: Strategy, rows: list[dict], images_dir: Path | None, cfg: Config) -> list[Image.Image]:
    """One pipeline call for a batch of plan rows: element i gets row i's source, prompt and seed."""
    g, res = cfg.generate, cfg.model.resolution
    kwargs = {
        "prompt": [r["prompt"] for r in rows],
        "generator": [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows],
        "num_images_per_prompt": 1,  # sources are repeated here: diffusers would tile them against the prompts
        "num_inference_steps": g.steps, "guidance_scale": g.guidance, "output_type": "pil",
    }
    if s.img2img:
        sources = {h: trainset.open_image(images_dir / f"{h}.jpg", res) for h in dict.fromkeys(r["source_md5hash"] for r in rows)}
        kwargs.update(image=[sources[r["source_md5hash"]] for r in rows], strength=g.strength)
    else:
        kwargs.update(height=res, width=res)
    return pipe(**kwargs).images


# --- inputs ----------------------------------------------------------------------------------


def _read_train(train_csv: Path) -> pd.DataFrame:
    train = trainset.read(train_csv)
    if train.empty:
        raise SkinaugError(f"{train_csv} has no rows")
    if train.md5hash.duplicated().any():
        raise SkinaugError(f"{train_csv} lists md5hash {train.md5hash[train.md5hash.duplicated()].iloc[0]} twice")
    unknown = sorted(set(train.label) - set(prompts.TOKENS))
    if unknown:
        raise SkinaugError(f"{train_csv}: label(s) without a token in prompts.TOKENS: {', '.join(unknown)}")
    odd = sorted(set(train.fitzpatrick_scale) - set(prompts.TONES))
    if odd:
        raise SkinaugError(f"{train_csv}: fitzpatrick_scale value(s) without a tone in prompts.TONES: {odd}")
    return train


def _check_sources(plan: pd.DataFrame, images_dir: Path) -> None:
    paths = [images_dir / f"{h}.jpg" for h in plan.source_md5hash.unique()]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise SkinaugError(f"{len(absent)} of {len(paths)} training images missing, first {absent[0]}")
    for path in paths:
        trainset.open_image(path)


def tokens_for(plan: pd.DataFrame, ti_dir: Path, base_dir: Path) -> dict[str, Path]:
    """token -> its file, for the labels in the plan; every file in ti_dir must fit the base (adapters.tokens_in)."""
    found = adapters.tokens_in(ti_dir, base_dir)
    needed = sorted({prompts.token(label) for label in plan.label})
    absent = [t for t in needed if t not in found]
    if absent:
        raise SkinaugError(f"{ti_dir} has no token file for {', '.join(absent)}")
    return {t: found[t] for t in needed}


def choose_lora(lora_dirs: list[Path], strategy: str) -> Path:
    """The LoRA folder a strategy uses: trained with the learned tokens for the strategies that
    prompt with them (img2img_ti_lora, the method), with plain condition names for img2img_lora.

    A folder without lora.json is taken on trust when it is the only one given."""
    wanted = strategy_of(strategy).ti
    made = {Path(d): adapters.trained_with_tokens(d) for d in lora_dirs}
    matching = [d for d, tokens in made.items() if tokens == wanted or (tokens is None and len(made) == 1)]
    if len(matching) != 1:
        how = "with the learned tokens (--ti-dir)" if wanted else "on plain condition names (no --ti-dir)"
        given = ", ".join(f"{d} ({'tokens' if t else 'plain' if t is False else 'unknown'})" for d, t in made.items())
        raise SkinaugError(f"strategy {strategy} needs one LoRA trained {how}; given {given}")
    return matching[0]


def loras_for(plan: pd.DataFrame, lora_dir: Path, mode: str, base_dir: Path) -> dict[str, Path]:
    """adapter name -> weights file: adapters.JOINT, or one per label of the plan in per_label mode;
    each must fit the base's UNet (adapters.check_lora_files)."""
    names = [adapters.JOINT] if mode == "joint" else [adapters.name(label) for label in sorted(set(plan.label))]
    files = {n: adapters.lora_file(lora_dir, n) for n in names}
    absent = [f for f in files.values() if not f.is_file()]
    if absent:
        raise SkinaugError(f"LoRA weights not found: {absent[0]} (lora.mode is {mode})")
    adapters.check_lora_files(base_dir, list(files.values()))
    return files


# --- outputs ---------------------------------------------------------------------------------


def _prepare(out_dir: Path, manifest: pd.DataFrame, fingerprint: dict, out_size: int) -> int:
    """Make out_dir hold only readable images of this plan; return how many are still to make."""
    images, state = out_dir / "images", out_dir / STATE_FILE
    if images.exists() and atomic.read_json(state) != fingerprint:
        print(f"generate: {images} holds images of other settings; starting over")
        shutil.rmtree(images)
    (out_dir / "manifest.csv").unlink(missing_ok=True)
    for leftover in out_dir.glob(".*"):  # temp files of killed writes (manifest, plan); ours is the only run
        if atomic.is_temp(leftover.name):
            leftover.unlink()
    images.mkdir(parents=True, exist_ok=True)
    atomic.write_json(state, fingerprint)
    planned = {out_dir / f for f in manifest.file}
    for path in images.iterdir():  # leftovers of a killed write, or files of no plan row
        if path not in planned:
            path.unlink()
    return sum(not _readable(p, out_size) for p in planned)


def _readable(path: Path, size: int) -> bool:
    if not path.exists():
        return False
    try:
        with Image.open(path) as im:
            ok = im.size == (size, size)
            im.verify()
    except Exception:  # noqa: BLE001 - any decoding failure: remake the image
        ok = False
    if not ok:
        path.unlink()
    return ok


def _save_png(path: Path, image: Image.Image, size: int) -> None:
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    with atomic.atomic_path(path, sweep=False) as tmp:  # _prepare cleared the folder's leftovers
        image.save(tmp, format="PNG")


def _batches(plan: pd.DataFrame, size: int, per_label: bool) -> list[list[dict]]:
    """Fixed chunks of the plan, within one label when each label has its own LoRA."""
    groups: dict = {}
    for row in plan.to_dict("records"):
        groups.setdefault(row["label"] if per_label else None, []).append(row)
    return [rows[i:i + size] for rows in groups.values() for i in range(0, len(rows), size)]

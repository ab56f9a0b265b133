"""The GPU check: every GPU stage of the paper profile, once, on the full-size SD 2.1-base architecture.

    bash benchmarks/gpu_check.sh .whl OUT_DIR    # a CUDA machine without internet: wheels, this, then `skinaug bench`
    skinaug gpu-check OUT_DIR                     # this smoke alone (needs CUDA; 76–89 s on an H200, 2026-11-30)
    skinaug gpu-check OUT_DIR --tiny              # the same code on the tiny model: about a minute on a CPU

The SD 2.1-base architecture is built from its configs with random weights (bench.build_base:
nothing is downloaded) and a handful of stand-in sources (640 x 480 JPEGs, one per label, 512 px
in the model) go through our real stage functions at the paper profile's settings, in bf16:
textual inversion (all seven tokens, a few updates, one checkpoint), LoRA on the learned tokens
(likewise), generation (generate.generate, img2img_ti_lora, 100 PNDM steps at strength 0.5,
guidance 2, the batch from free memory), a check that one batched call gives the images that
one-image calls give (within bf16 tolerance), and one epoch of each classifier architecture
(classify.run on real + synthetic images, random weights: no hub). Each stage must finish on
CUDA; its wall time and peak GPU memory (torch.cuda.max_memory_allocated, reset per stage) go
to OUT_DIR/gpu_check.json, rewritten after every stage so that a run cut short keeps what it
measured. A failed stage is recorded and the stages that do not need it still run.
"""
from __future__ import annotations

import datetime
import json
import math
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from skinaug import SkinaugError, atomic, config, first_line, prompts
from skinaug.bench import speed
from skinaug.diffusion import sd21

RESULT_FILE = "gpu_check.json"
STRATEGY = "img2img_ti_lora"  # the method: tokens, LoRA and img2img together
# Batched against one-image generation, bf16 on a GPU: mean absolute pixel difference (0-255)
# allowed. Different kernels per batch size round differently; a different seed moves pixels by
# tens (recorded beside it as the scale). fp32 on a CPU gives the same images (the test checks).
BATCH_TOLERANCE_PX = 2.0


@dataclass(frozen=True)
class Smoke:
    """How small the smoke is; everything else is the paper profile's."""
    tiny: bool
    resolution: int  # model side in pixels
    image_size: tuple[int, int]  # (width, height) of the stand-in JPEGs: not square, like most real ones
    train_steps: int = 3  # TI and LoRA optimiser updates, at the paper's batch sizes
    checkpoint_every: int = 2  # so that each fine-tuning run writes one resumable checkpoint
    gen_steps: int | None = None  # scheduler steps; None: the paper's
    compare_rows: int = 8  # plan rows generated both in one call and one by one
    classifier_sizes: tuple[int, int] | None = None  # (image_size, crop_size); None: the paper's


FULL = Smoke(tiny=False, resolution=speed.FULL.resolution, image_size=speed.FULL.image_size)
TINY = Smoke(tiny=True, resolution=speed.TINY.resolution, image_size=speed.TINY.image_size, gen_steps=4, compare_rows=4,
             classifier_sizes=(speed.TINY.classifier_size, speed.TINY.classifier_crop))


def smoke_config(s: Smoke, device: torch.device, base_dir: Path) -> config.Config:
    """The paper profile (composed from conf/) at the smoke's sizes, bf16 on a GPU, checked as params are."""
    cfg = speed.paper_config()
    ti, lo, g, c = cfg.textual_inversion, cfg.lora, cfg.generate, cfg.classify
    image_size, crop_size = s.classifier_sizes or (c.image_size, c.crop_size)
    cfg = replace(
        cfg,
        model=replace(cfg.model, base=str(base_dir), resolution=s.resolution, device=device.type,
                      mixed_precision="bf16" if device.type == "cuda" else "no"),
        textual_inversion=replace(ti, steps=s.train_steps, checkpoint_every=s.checkpoint_every),
        lora=replace(lo, steps=s.train_steps, checkpoint_every=s.checkpoint_every),
        generate=replace(g, steps=s.gen_steps or g.steps, strategy=STRATEGY),
        classify=replace(c, epochs=1, pretrained=False, image_size=image_size, crop_size=crop_size),
    )
    return config.from_dict(asdict(cfg), source="gpu-check settings")


def stand_in_split(folder: Path, s: Smoke) -> None:
    """folder/split/{train,test}.csv and folder/images/: one training source and one test image per label."""
    train, _ = speed.write_train_split(folder, replace(speed.FULL, per_label=2, image_size=s.image_size))
    first = train.groupby("label").cumcount() == 0
    atomic.write_csv(folder / "split" / "train.csv", train[first])
    atomic.write_csv(folder / "split" / "test.csv", train[~first])


def dvclive_installed() -> bool:
    """Whether DVCLive imports (the GPU check's wheels carry no DVC, which it needs)."""
    try:
        import dvclive  # noqa: F401
    except ImportError:
        return False
    return True


# --- the stages --------------------------------------------------------------------------------------

class _Check:
    """Runs stages in order, records each one's outcome, time and peak GPU memory, and rewrites the JSON."""

    def __init__(self, path: Path, device: torch.device, result: dict):
        self.path, self.device, self.result = path, device, {**result, "stages": {}}

    def ok(self, name: str) -> bool:
        return self.result["stages"].get(name, {}).get("ok", False)

    def run(self, name: str, fn, needs: tuple[str, ...] = ()) -> bool:
        entry = {"ok": False, "seconds": None, "peak_memory_gb": None, "details": {}}
        missing = [n for n in needs if not self.ok(n)]
        if missing:
            entry["error"] = f"skipped: needs {', '.join(missing)}"
            return self._record(name, entry)
        print(f"gpu-check: {name}...", flush=True)
        speed.release()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            fn(entry["details"])
            speed.sync(self.device)
            entry["ok"] = True
        except Exception as e:  # noqa: BLE001 - a check records every failure and goes on
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {first_line(e)}"
        entry["seconds"] = time.perf_counter() - start
        if cuda:
            try:
                entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            except RuntimeError as e:  # a sticky CUDA error from the stage: recorded, the run goes on
                entry.update(ok=False, error=entry.get("error") or f"RuntimeError: {first_line(e)}")
            if entry["ok"] and entry["peak_memory_gb"] == 0:
                entry.update(ok=False, error="nothing was allocated on the GPU: the stage did not run on CUDA")
        return self._record(name, entry)

    def _record(self, name: str, entry: dict) -> bool:
        self.result["stages"][name] = entry
        atomic.write_json(self.path, self.result)
        memory = "" if entry["peak_memory_gb"] is None else f", peak {entry['peak_memory_gb']:.1f} GB"
        took = "" if entry["seconds"] is None else f" in {entry['seconds']:.1f} s{memory}"
        print(f"gpu-check: {name} {'ok' if entry['ok'] else 'FAILED (' + entry['error'] + ')'}{took}", flush=True)
        return entry["ok"]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SkinaugError(message)


def _expect_device(found: torch.device | str, device: torch.device, what: str) -> None:
    _expect(torch.device(found).type == device.type, f"{what} ran on {found}, not {device.type}")


def _finite(values, what: str) -> list[float]:
    values = [float(v) for v in values]
    _expect(all(math.isfinite(v) for v in values), f"{what} not finite: {values}")
    return values


def run(out_dir: Path, tiny: bool = False) -> dict:
    """Every stage once; returns the result written to out_dir/gpu_check.json (with 'table' and 'path').

    Without --tiny it needs CUDA. A failed stage is recorded (result['ok'] false), not raised.
    """
    from skinaug.classify import classifiers
    from skinaug.diffusion import finetune, generate

    s = TINY if tiny else FULL
    if not tiny and not torch.cuda.is_available():
        raise SkinaugError("gpu-check needs a CUDA device and none is visible; `skinaug gpu-check --tiny` runs "
                           "the same code on the CPU")
    device = sd21.pick_device("auto")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "card": speed.card_name(device), "device": device.type,
              "tiny": tiny, "versions": speed.versions(),
              "base": "tiny model" if tiny else "SD 2.1-base architecture, random weights",
              "precision": "bf16" if device.type == "cuda" else "fp32", "settings": asdict(s),
              "batch_tolerance_px": BATCH_TOLERANCE_PX}
    check = _Check(out_dir / RESULT_FILE, device, result)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skinaug-gpu-check-") as tmp:
        tmp = Path(tmp)
        base_dir, ti_dir, lora_dir, syn_dir = tmp / "base", tmp / "ti", tmp / "lora", tmp / "syn"
        split, images_dir = tmp / "split", tmp / "images"  # stand_in_split writes them
        cfg = smoke_config(s, device, base_dir)
        check.result["paper_settings"] = {k: asdict(getattr(cfg, k)) for k in
                                          ("textual_inversion", "lora", "generate", "classify")}

        def model(d):
            speed.build_base(base_dir, speed.TINY if tiny else speed.FULL, device)
            stand_in_split(tmp, s)
            d.update(resolution=s.resolution, sources=len(prompts.TOKENS), source_size=list(s.image_size))

        def textual_inversion(d):
            devices = set()
            summary = finetune.train_textual_inversion(
                split / "train.csv", images_dir, base_dir, ti_dir, cfg, seed=0,
                on_step=lambda step, losses, text_encoder: devices.add(str(text_encoder.device)))
            ti = cfg.textual_inversion
            d.update(steps=summary["steps"], tokens=len(summary["tokens"]), devices=sorted(devices),
                     images_per_update=len(summary["tokens"]) * ti.batch_size * ti.grad_accum,
                     mixed_precision=summary["mixed_precision"],
                     final_loss=_finite([t["final_loss"] for t in summary["tokens"].values()], "TI losses"))
            for found in devices:
                _expect_device(found, device, "textual inversion")
            _expect(len(list(ti_dir.glob("*.safetensors"))) == len(prompts.TOKENS), f"{ti_dir} lacks token files")

        def lora(d):
            devices = set()
            summary = finetune.train_lora(split / "train.csv", images_dir, base_dir, ti_dir, lora_dir, cfg, seed=0,
                                          on_step=lambda step, loss, unet: devices.add(str(unet.device)))
            d.update(steps=summary["steps"], batch_size=cfg.lora.batch_size, tokens=summary["tokens"],
                     devices=sorted(devices), mixed_precision=summary["mixed_precision"],
                     final_loss=_finite([v["final_loss"] for v in summary["loras"].values()], "LoRA loss"))
            for found in devices:
                _expect_device(found, device, "LoRA")
            _expect(summary["tokens"], "the LoRA did not train on the learned tokens")

        def generation(d):
            start = time.perf_counter()
            manifest = generate.generate(split / "train.csv", images_dir, base_dir, syn_dir, cfg, seed=0,
                                         ti_dir=ti_dir, lora_dir=[lora_dir], strategy=STRATEGY)
            seconds = time.perf_counter() - start
            dtype = sd21.weight_dtype(cfg.model, device)
            d.update(images=len(manifest), batch_size=generate.batch_size(cfg, device, dtype),
                     images_per_s_with_loading=len(manifest) / seconds, steps=cfg.generate.steps,
                     strength=cfg.generate.strength, guidance=cfg.generate.guidance)
            _expect(len(manifest) == len(prompts.TOKENS) * cfg.generate.per_source,
                    f"{len(manifest)} images, not {len(prompts.TOKENS) * cfg.generate.per_source}")
            absent = [f for f in manifest.file if not (syn_dir / f).is_file()]
            _expect(not absent, f"{len(absent)} generated images missing")

        def batched_vs_single(d):
            d.update(_batched_vs_single(split / "train.csv", images_dir, base_dir, ti_dir, lora_dir, cfg, s, device))
            _expect(d["batched_vs_single"]["mean_abs_pixel"] <= BATCH_TOLERANCE_PX,
                    f"batched images differ from one-image calls by {d['batched_vs_single']['mean_abs_pixel']:.3g} "
                    f"of 255 on average (tolerance {BATCH_TOLERANCE_PX})")

        def classifier(arch):
            def stage(d):
                train_type = "real_syn" if check.ok("generation") else "real"  # still runs when generation failed
                # the training curve (DVCLive), as the classify stage writes it; the GPU machine's
                # wheels may lack DVCLive (it needs DVC itself), and the curve is CPU work
                live_dir = tmp / "live" / arch if dvclive_installed() else None
                (record,) = classifiers.run(split, images_dir, syn_dir if train_type != "real" else None,
                                         {"test": tmp / "metrics" / f"{arch}.json"}, arch, train_type, cfg, seed=0,
                                         live_dir=live_dir)
                d.update(train_type=train_type, n_train=record["n_train"]["total"], n_test=record["n_test"],
                         epochs=record["epochs"], batch_size=cfg.classify.batch_size,
                         crop_size=cfg.classify.crop_size)
                if live_dir is None:
                    d["loss"] = "not recorded: DVCLive is not installed here"
                else:
                    last = json.loads((live_dir / "metrics.json").read_text())  # the last epoch's values
                    d["loss"] = _finite([last["train"]["loss"]], "loss")[0]
                _expect_device(record["device"], device, arch)
            return stage

        check.run("model", model)
        check.run("textual_inversion", textual_inversion, needs=("model",))
        check.run("lora", lora, needs=("textual_inversion",))
        check.run("generation", generation, needs=("lora",))
        check.run("batched_vs_single", batched_vs_single, needs=("lora",))
        for arch in cfg.classify.archs:
            check.run(f"classifier_{arch}", classifier(arch), needs=("model",))
    r = check.result
    r["seconds"] = time.perf_counter() - started
    r["ok"] = all(stage["ok"] for stage in r["stages"].values())
    r["table"] = table(r)
    atomic.write_json(check.path, r)
    r["path"] = str(check.path)
    return r


def _batched_vs_single(train_csv: Path, images_dir: Path, base_dir: Path, ti_dir: Path, lora_dir: Path,
                       cfg: config.Config, s: Smoke, device: torch.device) -> dict:
    """The first compare_rows rows of the generation plan in one call and one call each, through the
    stage's own pipeline (tokens and LoRA loaded); their difference, and that between different seeds."""
    from skinaug.diffusion import adapters, generate

    strategy = generate.strategy_of(STRATEGY)
    files, tokens = adapters.token_files(ti_dir, cfg.subset.labels)
    pipe = generate.load_pipeline(base_dir, strategy, dict(zip(tokens, files)), adapters.trained_loras(lora_dir), cfg,
                                  device, sd21.weight_dtype(cfg.model, device))
    _expect_device(pipe.device, device, "generation")
    rows = generate.make_plan(train_csv, cfg, 0, STRATEGY).head(s.compare_rows).to_dict("records")
    start = time.perf_counter()
    batched = generate.synthesize(pipe, strategy, rows, images_dir, cfg)
    speed.sync(device)
    middle = time.perf_counter()
    single = [generate.synthesize(pipe, strategy, [row], images_dir, cfg)[0] for row in rows]
    speed.sync(device)
    end = time.perf_counter()
    del pipe
    return {"rows": len(rows), "batched_images_per_s": len(rows) / (middle - start),
            "single_images_per_s": len(rows) / (end - middle),
            "batched_vs_single": speed.image_difference(batched, single),
            # neighbouring rows: other seeds (and at a source's boundary, another source): the scale of a real change
            "different_seed_scale": speed.image_difference(batched[:-1], batched[1:])}


def table(r: dict) -> str:
    """One markdown table: each stage's outcome, time and peak GPU memory."""
    head = (f"skinaug gpu-check: {r['card']}{' (--tiny: TINY model)' if r['tiny'] else ''}, {r['precision']}, "
            f"{r['base']}; {'all stages ok' if r.get('ok') else 'SOME STAGES FAILED'}")
    rows = []
    for name, e in r["stages"].items():
        memory = "-" if e["peak_memory_gb"] is None else f"{e['peak_memory_gb']:.1f}"
        seconds = "-" if e["seconds"] is None else f"{e['seconds']:.1f}"
        rows.append(f"| {name} | {'ok' if e['ok'] else e['error']} | {seconds} | {memory} |")
    return "\n".join([head, "", "| stage | outcome | seconds | peak GPU memory, GB |", "|---|---|---|---|", *rows])

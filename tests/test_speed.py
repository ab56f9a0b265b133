"""`skinaug bench`: the tiny run end to end, the FLOP counter, the SD 2.1-base configs, the study arithmetic."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from skinaug import config
from skinaug.bench import speed
from skinaug.cli import main
from skinaug.diffusion import sd21

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`skinaug bench --tiny` once, from a folder without params.yaml (the bench must not need it)."""
    where = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors gain nothing from threads; spinning ones lose a lot beside a busy core
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(where)
            result = CliRunner().invoke(main, ["bench", "--tiny", "--device", "cpu", "--out-dir", "results"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output + repr(result.exception)
    (path,) = (where / "results").glob("*.json")
    return path.name, json.loads(path.read_text()), result.output


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_bench_writes_every_figure(tiny_run):
    name, r, output = tiny_run
    assert name.endswith("_cpu-tiny.json") and name.startswith(r["date"])
    assert r["tiny"] is True and r["device"] == "cpu" and r["card"].startswith("CPU")
    assert set(r["versions"]) >= {"torch", "diffusers", "transformers", "peft"}
    assert r["settings"]["per_source"] == 5 and r["settings"]["strength"] == 0.5 and r["settings"]["guidance"] == 2.0
    assert _positive(r["matmul"]["flop_per_s"]) and "CPU" in r["matmul"]["label"]

    g = r["generation"]
    for way in ("reference", "ours"):
        assert _positive(g[way]["images_per_s"]) and _positive(g[way]["mfu"]) and _positive(g[way]["load_s"])
        assert g[way]["peak_memory_gb"] is None  # no GPU
    assert _positive(g["ratio"])
    assert g["flops"]["total_tflop"] > g["flops"]["unet_tflop"] > 0
    assert g["flops"]["unet_calls_per_image"] == 2 * 3  # 4 PNDM steps at strength 0.5 run 3 UNet calls, x2 guidance
    f = g["fast_sampler"]
    assert "DIFFERENT SETTING" in f["setting"] and _positive(f["images_per_s"]) and _positive(f["speedup_vs_ours"])
    assert set(f["difference_vs_pndm"]) == {"mean_abs_pixel", "max_abs_pixel", "mean_colour", "mean_abs_ita"}

    for stage in ("ti", "lora"):
        for way in ("reference", "ours"):
            assert _positive(r[stage][way]["images_per_s"]) and _positive(r[stage][way]["update_s"])
        assert _positive(r[stage]["ratio"])
    assert r["ti"]["ours"]["images_per_update"] == 7 * r["ti"]["reference"]["images_per_update"]
    assert _positive(r["ti"]["reference"]["load_s"]) and _positive(r["ti"]["ours"]["cache_s_per_image"])
    assert all(_positive(v) for v in r["ti"]["end_to_end_images_per_s"].values())

    c = r["classifiers"]
    assert set(c["archs"]) == {"vgg16", "resnet18", "vit_b_16"}
    assert all(_positive(v) for rates in c["archs"].values() for v in rates.values())
    assert all(_positive(v) for v in c["decode_s_per_image"].values())

    h = r["study_hours"]
    for way in ("reference", "ours"):
        assert set(h[way]) == {"ti", "lora", "generation", "classifiers", "total"}
        assert all(_positive(v) for v in h[way].values())
    assert "| whole paper study, GPU-hours |" in output and "TINY model, not the real figures" in output


@pytest.mark.slow
def test_same_seed_gives_the_same_image_both_ways(tiny_run):
    """Image 0 of the reference's call with seed i equals our image with seed i (fp32 on a CPU).

    Only image 0: the reference draws all 5 images of a call from one generator (the VAE
    sample, then 5 noises in a row); ours gives every image a generator of its own.
    """
    d = tiny_run[1]["generation"]["same_seed_difference"]
    assert d["max_abs_pixel"] <= 1 and d["mean_abs_pixel"] < 0.01


def test_flop_count_is_positive_and_proportional_to_batch(tiny_base):
    from diffusers import UNet2DConditionModel

    assert speed.count_flops(lambda: torch.ones(8, 16) @ torch.ones(16, 4)) == 2 * 8 * 16 * 4
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    one, two = speed.unet_flops(unet, batch=1), speed.unet_flops(unet, batch=2)
    assert one > 0 and two == 2 * one


def test_sd21_base_configs_give_the_real_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no memory, no init time
        models = (UNet2DConditionModel(**sd21.SD21_BASE_UNET), AutoencoderKL(**sd21.SD21_BASE_VAE),
                  CLIPTextModel(CLIPTextConfig(**sd21.SD21_BASE_TEXT_ENCODER)))
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for m in models]
    assert millions == [865.9, 83.7, 340.4]


def test_ours_runs_the_paper_profile_whatever_params_say(repo_cfg, tmp_path, monkeypatch):
    """The demo profile's params (or none) must not leak into ours: it runs conf/'s paper profile."""
    monkeypatch.chdir(tmp_path)  # no conf/ here: found beside the source tree
    paper = speed.paper_config()
    assert paper.profile == "paper" and paper.textual_inversion.steps == 500
    for cfg in (None, repo_cfg):
        ours = speed.ours_config(cfg, speed.FULL, torch.device("cuda"), tmp_path)
        assert ours.model.mixed_precision == paper.model.mixed_precision and ours.model.resolution == 512
        assert ours.generate == speed.replace(paper.generate, steps=100, strength=0.5, guidance=2.0, per_source=5)
        assert (ours.textual_inversion.batch_size, ours.textual_inversion.grad_accum, ours.lora.batch_size) == (4, 4, 4)
    assert speed.ours_config(None, speed.TINY, torch.device("cpu"), tmp_path).model.mixed_precision == "no"


def test_study_sizes_come_from_paper_params_only(repo_cfg):
    study = speed.Study.of(repo_cfg)  # the demo profile's numbers are not the study's: conf/'s paper profile
    assert study == speed.Study.of(config.compose("paper")) and study.ti_steps != repo_cfg.textual_inversion.steps
    assert (study.seeds, study.tokens, study.train_images[1], study.test_images[1]) == (5, 7, 1519, 56)
    paper = config.replace(repo_cfg, profile="paper",
                           textual_inversion=config.replace(repo_cfg.textual_inversion, steps=400, grad_accum=2))
    study = speed.Study.of(paper)
    assert study.ti_steps == 400 and study.ti_images_per_step == repo_cfg.textual_inversion.batch_size * 2


def test_study_estimate_arithmetic():
    """Round figures in, hours out: one scenario, one seed, one classifier, no loading costs."""
    study = speed.Study(seeds=1, tokens=7, ti_steps=100, ti_images_per_step=10, lora_steps=100, lora_batch=4,
                        per_source=5, train_images={1: 100}, test_images={1: 10}, classifier_archs=("resnet18",),
                        classifier_epochs=2)
    s = speed.replace(speed.TINY, per_label=0)
    way = {"load_s": 0.0, "fixed_s": 0.0, "cache_s_per_image": 0.0, "images_per_s": 1.0}
    r = {
        "ti": {"reference": {**way, "load_s": 36.0}, "ours": {**way, "images_per_s": 7.0}},
        "lora": {"reference": way, "ours": {**way, "images_per_s": 2.0}},
        "generation": {"reference": way, "ours": {**way, "images_per_s": 5.0}},
        "classifiers": {"archs": {"resnet18": {"train_images_per_s": 100.0, "eval_images_per_s": 1000.0}},
                        "decode_s_per_image": {"real_jpeg": 0.0, "synthetic_png": 0.0}},
    }
    h = speed.study_estimate(r, study, s)
    assert h["reference"]["ti"] == pytest.approx(7 * (36 + 1000) / 3600)  # 7 loads, 7 x 1,000 images at 1/s
    assert h["ours"]["ti"] == pytest.approx(1000 / 3600)  # 7,000 images at 7/s
    assert h["ours"]["lora"] == pytest.approx(200 / 3600) and h["ours"]["generation"] == pytest.approx(100 / 3600)
    # real 100, syn 500, real+syn 600 images x 2 epochs at 100/s, plus 10 test images per epoch at 1000/s
    assert h["ours"]["classifiers"] == pytest.approx(2 * (1200 / 100 + 3 * 10 / 1000) / 3600)
    assert h["ratio"] == pytest.approx(h["reference"]["total"] / h["ours"]["total"])


@pytest.mark.gpu
def test_tiny_bench_on_the_gpu_reports_memory_and_precisions(tmp_path):
    r = speed.run(tmp_path, tiny=True, device="cuda")
    assert r["precision"] == {"reference": "fp16", "ours": "bf16"}
    assert r["generation"]["reference"]["peak_memory_gb"] > 0 and r["generation"]["ours"]["peak_memory_gb"] > 0
    assert "bf16" in r["matmul"]["label"] and r["study_hours"]["ours"]["total"] > 0


def test_generation_profile_script_times_every_variant(tmp_path):
    """benchmarks/generation_profile.py --tiny: one record per variant, each a settings change of the bench's call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generation_profile", ROOT / "benchmarks" / "generation_profile.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script.main(str(tmp_path), tiny=True)
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "generation_profile.json").read_text())
    variants = list(r["variants"].values())
    assert len(variants) == 4 and r["rows"] == 4
    assert [(v["channels_last"], v["vae_slicing"]) for v in variants] == [(True, True), (False, True),
                                                                          (False, False), (False, False)]
    assert len({v["unet_calls"] for v in variants}) == 1 and variants[0]["unet_calls"] > 0
    for v in variants:
        assert all(_positive(v[k]) for k in ("images_per_s", "mfu", "call_s", "unet_forward_s", "unet_share_of_call"))

"""The GPU check: benchmarks/gpu_check.sh --tiny end to end on the CPU, its settings, its bookkeeping, its wheels."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from skinaug import SkinaugError, config
from skinaug.bench import gpucheck, speed
from skinaug.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _script(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}, timeout=900)


@pytest.mark.slow
def test_script_tiny_runs_every_stage_then_the_bench(tmp_path):
    """The script as a GPU machine runs it, on the tiny model: install (no wheels here), smoke, bench."""
    wheels, out, hide = tmp_path / "wheels", tmp_path / "out", tmp_path / "hide" / "dvclive"
    wheels.mkdir()
    hide.mkdir(parents=True)  # as on the GPU machine, whose wheels carry no DVCLive (it needs DVC)
    (hide / "__init__.py").write_text('raise ImportError("no dvclive here")\n')
    done = _script(wheels, out, "--tiny", PYTHONPATH=hide.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and all((out / f).is_file() for f in files)  # the device returns <= 8 files, flat
    log = (out / "gpu_check.log").read_text()
    assert "installing 0 wheel(s) and skinaug" in log and "smoke exit 0, bench exit 0" in log
    assert log.index("== skinaug gpu-check") < log.index("== skinaug bench")
    assert "| whole paper study, GPU-hours |" in log  # the bench's last row: every workload ran

    r = json.loads((out / gpucheck.RESULT_FILE).read_text())
    assert r["ok"] is True and r["tiny"] is True and r["device"] == "cpu"
    archs = config.compose("paper").classify.archs
    assert list(r["stages"]) == ["model", "textual_inversion", "lora", "generation", "batched_vs_single",
                                 *(f"classifier_{a}" for a in archs)]
    for name, stage in r["stages"].items():
        assert stage["ok"] and stage["seconds"] > 0 and stage["peak_memory_gb"] is None, name
    st = r["stages"]
    assert st["textual_inversion"]["details"]["images_per_update"] == 7 * 4 * 4  # paper batch x accumulation x tokens
    assert st["textual_inversion"]["details"]["devices"] == ["cpu"] and st["lora"]["details"]["tokens"] is True
    assert st["generation"]["details"]["images"] == 7 * 5
    assert all(st[f"classifier_{a}"]["details"]["train_type"] == "real_syn" for a in archs)
    assert all("DVCLive is not installed" in st[f"classifier_{a}"]["details"]["loss"] for a in archs)
    # fp32 on a CPU: a batched call gives exactly the one-image calls' images; another seed moves them far more
    compare = st["batched_vs_single"]["details"]
    assert compare["batched_vs_single"]["max_abs_pixel"] <= 1
    assert compare["different_seed_scale"]["mean_abs_pixel"] > 5 * gpucheck.BATCH_TOLERANCE_PX

    (bench_json,) = out.glob("*_cpu-tiny.json")
    b = json.loads(bench_json.read_text())
    assert b["tiny"] is True and {"generation", "ti", "lora", "classifiers", "study_hours"} <= set(b)


def test_script_refuses_bad_arguments_in_one_line(tmp_path):
    done = _script(tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("Error: usage: bash benchmarks/gpu_check.sh")
    done = _script(tmp_path, tmp_path / "out", "--fast")
    assert done.returncode == 2 and "usage" in done.stderr
    done = _script(tmp_path / "absent", tmp_path / "out")
    assert done.returncode == 2 and "wheels folder" in done.stderr and "make gpu-wheels" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_only_tiny_runs(tmp_path):
    result = CliRunner().invoke(main, ["gpu-check", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Error: gpu-check needs a CUDA device" in result.output
    assert "--tiny" in result.output and not (tmp_path / "out").exists()


def test_a_failed_stage_is_recorded_and_its_dependents_skipped(tmp_path):
    check = gpucheck._Check(tmp_path / "r.json", torch.device("cpu"), {"card": "x"})

    def broken(details):
        details["seen"] = 1
        raise SkinaugError("no luck\nsecond line")

    assert check.run("first", lambda d: d.update(n=2)) is True
    assert check.run("broken", broken) is False
    assert check.run("after", lambda d: None, needs=("first", "broken")) is False
    r = json.loads((tmp_path / "r.json").read_text())  # written after every stage
    assert r["card"] == "x" and r["stages"]["first"]["details"] == {"n": 2}
    assert r["stages"]["broken"]["error"] == "SkinaugError: no luck" and r["stages"]["broken"]["details"] == {"seen": 1}
    assert r["stages"]["after"]["error"] == "skipped: needs broken" and r["stages"]["after"]["seconds"] is None


def test_cli_exits_non_zero_naming_failed_stages(tmp_path, monkeypatch):
    failed = {"ok": False, "seconds": 1.0, "table": "TABLE", "path": str(tmp_path / "gpu_check.json"),
              "stages": {"model": {"ok": True}, "lora": {"ok": False}}}
    monkeypatch.setattr(gpucheck, "run", lambda out_dir, tiny: failed)
    result = CliRunner().invoke(main, ["gpu-check", str(tmp_path), "--tiny"])
    assert result.exit_code == 1 and "TABLE" in result.output
    assert "Error: gpu-check: 1 stage(s) failed (lora)" in result.output


def test_smoke_runs_the_paper_profile_at_small_sizes(tmp_path):
    paper = config.compose("paper")
    cfg = gpucheck.smoke_config(gpucheck.FULL, torch.device("cuda"), tmp_path)
    assert cfg.profile == "paper" and cfg.model.mixed_precision == "bf16" and cfg.model.resolution == 512
    assert cfg.generate == config.replace(paper.generate, strategy=gpucheck.STRATEGY)  # the paper's sampler settings
    assert (cfg.generate.steps, cfg.generate.strength, cfg.generate.guidance) == (100, 0.5, 2.0)
    ti, lo = cfg.textual_inversion, cfg.lora
    assert (ti.batch_size, ti.grad_accum, lo.batch_size) == (paper.textual_inversion.batch_size,
                                                             paper.textual_inversion.grad_accum, paper.lora.batch_size)
    assert ti.steps == lo.steps == gpucheck.FULL.train_steps > ti.checkpoint_every == lo.checkpoint_every > 0
    c = cfg.classify
    assert c.archs == paper.classify.archs and c.epochs == 1 and c.pretrained is False  # no hub on the device
    assert (c.image_size, c.crop_size, c.batch_size) == (paper.classify.image_size, paper.classify.crop_size,
                                                         paper.classify.batch_size)
    tiny = gpucheck.smoke_config(gpucheck.TINY, torch.device("cpu"), tmp_path)
    assert tiny.model.mixed_precision == "no" and tiny.model.resolution == speed.TINY.resolution


def test_carried_wheels_meet_the_project_requirements():
    """benchmarks/gpu-wheels.txt pins one version of each package, within pyproject's bounds."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = [Requirement(line) for line in (ROOT / "benchmarks/gpu-wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    names = [canonicalize_name(p.name) for p in pins]
    assert len(names) == len(set(names)) and all(str(p.specifier).startswith("==") for p in pins)
    pinned = {canonicalize_name(p.name): next(iter(p.specifier)).version for p in pins}
    needed = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    carried = {"diffusers", "transformers", "peft", "accelerate", "safetensors", "hydra-core"}
    for req in needed:
        if canonicalize_name(req.name) in carried:
            assert req.specifier.contains(pinned[canonicalize_name(req.name)]), req

"""launch.processes > 1 re-runs a diffusion stage's command under `accelerate launch` (skinaug.launch),
and model.device picks one card (diffusion.pick_device).

The slow tests drive the real dvc.yaml on the reduced demo of tests/dvcrepo.py (one module-scoped
`dvc repro generate@0`, then single stages): changing only the launcher or the device re-runs nothing,
two CPU processes (gloo) make the outputs of one, and two queued experiments with different
model.device values both succeed. About 8 minutes on 2 busy CPU cores, mostly process start-up.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time

import pytest
import torch
import yaml
from dvcrepo import OVERRIDES, RUN_TIMEOUT_S, Repo, make_repo
from safetensors.torch import load_file

from skinaug import SkinaugError, launch
from skinaug.diffusion import sd21

ARGV = ["--params", "p.yaml", "lora", "split", "images", "base", "out", "--seed", "0"]


def _with(cfg, device="auto", **launch_changes):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device),
                               launch=dataclasses.replace(cfg.launch, **launch_changes))


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_one_machine_runs_the_same_command_under_accelerate(repo_cfg):
    cmd = launch.command(_with(repo_cfg, processes=4), ARGV)
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[-len(ARGV) - 2:] == ["-m", "skinaug", *ARGV]  # the very same arguments, params file included
    assert _option(cmd, "--num_processes") == "4" and _option(cmd, "--num_machines") == "1"
    assert _option(cmd, "--main_process_port") == "0"  # a free port: queued experiments launch side by side
    assert _option(cmd, "--mixed_precision") == "no"  # model.mixed_precision decides, inside our code
    assert "--gpu_ids" not in cmd and "--machine_rank" not in cmd


def test_cuda_k_gives_this_machine_s_processes_the_cards_from_k(repo_cfg):
    cmd = launch.command(_with(repo_cfg, "cuda:4", processes=4), ARGV, device_count=8)
    assert _option(cmd, "--gpu_ids") == "4,5,6,7"
    with pytest.raises(SkinaugError, match=r"^model.device is cuda:6 with 4 processes on this machine: "
                                           r"that needs cards 6 to 9, and it has 8;"):
        launch.command(_with(repo_cfg, "cuda:6", processes=4), ARGV, device_count=8)


def test_several_machines_get_rank_address_and_port(repo_cfg, monkeypatch):
    cfg = _with(repo_cfg, "cuda:0", processes=16, num_machines=2, main_process_ip="10.0.0.1",
                main_process_port=29500)
    monkeypatch.setenv(launch.RANK_VARIABLE, "1")
    cmd = launch.command(cfg, ARGV, device_count=8, rank=launch.machine_rank(cfg.launch))
    assert _option(cmd, "--num_processes") == "16" and _option(cmd, "--num_machines") == "2"
    assert _option(cmd, "--machine_rank") == "1" and _option(cmd, "--main_process_ip") == "10.0.0.1"
    assert _option(cmd, "--main_process_port") == "29500"
    assert _option(cmd, "--gpu_ids") == "0,1,2,3,4,5,6,7"  # 8 per machine
    for bad in ("2", "one", "-1"):
        monkeypatch.setenv(launch.RANK_VARIABLE, bad)
        with pytest.raises(SkinaugError, match=rf"^{launch.RANK_VARIABLE} is '{bad}'; allowed: 0 to 1 "):
            launch.machine_rank(cfg.launch)


@pytest.fixture
def execs(monkeypatch) -> list[list[str]]:
    """Records the full command line relaunch_if_asked would run, instead of running accelerate."""
    calls = []
    monkeypatch.setattr(launch, "run_launcher", lambda args: calls.append([sys.executable, "-m",
                                                                          "accelerate.commands.launch", *args]))
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_one_process_runs_in_place(repo_cfg, execs):
    assert launch.relaunch_if_asked(_with(repo_cfg, processes=1), ARGV) is False
    assert execs == []


def test_more_processes_run_the_launcher_instead_of_the_stage(repo_cfg, execs):
    assert launch.relaunch_if_asked(_with(repo_cfg, processes=2), ARGV) is True  # the command returns, its work done
    assert execs == [launch.command(_with(repo_cfg, processes=2), ARGV)]


@pytest.mark.parametrize("variable", launch.LAUNCHER_VARIABLES)
def test_a_process_a_launcher_started_never_relaunches(repo_cfg, execs, monkeypatch, variable):
    monkeypatch.setenv(variable, "0")
    assert launch.relaunch_if_asked(_with(repo_cfg, processes=2), ARGV) is False
    assert execs == []


def test_a_failed_worker_is_one_line_not_torchrun_s_traceback(monkeypatch):
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fail(args):
        raise ChildFailedError("skinaug", {1: ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file="")})

    monkeypatch.setattr(accelerate_launch, "launch_command", fail)
    with pytest.raises(SkinaugError) as err:
        launch.run_launcher(["--multi_gpu", "--num_processes", "2", "-m", "skinaug", "lora"])
    assert str(err.value) == "launched process(es) 1 (exit status 1) failed; their errors are above"


@pytest.fixture
def cards(monkeypatch):
    """A machine with `n` CUDA cards, as torch sees it (set_device recorded, not called)."""
    chosen = []

    def machine(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        return chosen

    return machine


def test_cuda_k_is_card_k_and_becomes_the_current_device(cards):
    chosen = cards(2)
    assert sd21.pick_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [1]  # accelerate's Accelerator, which says plain "cuda", lands there too


def test_a_card_that_does_not_exist_is_one_clear_error(cards):
    cards(2)
    with pytest.raises(SkinaugError) as err:
        sd21.pick_device("cuda:2")
    assert str(err.value) == ("model.device is cuda:2 but this machine shows 2 CUDA device(s), cuda:0 to cuda:1; "
                              "pick one of those (or check CUDA_VISIBLE_DEVICES)")


def test_cuda_k_without_cuda_is_one_clear_error(cards):
    cards(0)
    with pytest.raises(SkinaugError, match=r"^device cuda:0 asked for but no CUDA device is visible; set model.device"):
        sd21.pick_device("cuda:0")


def test_under_a_multi_process_launcher_the_launcher_picks_the_card(cards, monkeypatch):
    chosen = cards(4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sd21.pick_device("cuda:2") == torch.device("cuda")  # accelerate: one card per local rank
    assert chosen == []


@pytest.mark.parametrize("device, n, error", [
    ("cuda:0", 0, "device cuda:0 asked for but no CUDA device is visible; set model.device (or --device) to auto or cpu"),
    ("cuda", 0, "device cuda asked for but no CUDA device is visible; set model.device (or --device) to auto or cpu"),
    ("cuda:1", 2, "model.device is cuda:1 with 2 processes on this machine: that needs cards 1 to 2, and it has 2; "
                  "pick a lower card, fewer launch.processes, or model.device cuda"),
])
def test_a_stage_asked_for_cards_it_cannot_have_stops_in_one_line_before_launching(
        params_file, cards, execs, tmp_path, device, n, error):
    from click.testing import CliRunner

    from skinaug import cli

    cards(n)
    params = params_file(model={"device": device}, launch={"processes": 2})
    for name in ("split", "images", "base"):
        (tmp_path / name).mkdir()
    args = ["--params", str(params), "lora", *(str(tmp_path / name) for name in ("split", "images", "base", "out")),
            "--seed", "0"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"Error: {error}"]
    assert execs == [] and not (tmp_path / "out").exists()


# --- through DVC (slow) ------------------------------------------------------------------------------

DIFFUSION = ("textual_inversion@0", "lora@0", "generate@0")


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Repo, dict]:
    """The reduced demo up to generation with one process; returns the repo and dvc.lock's stages then."""
    repo = make_repo(tmp_path_factory.mktemp("launch"))
    repo.compose_params(OVERRIDES)
    repo.run("git", "commit", "-qam", "reduced demo")  # queued experiments start from this commit
    repo.dvc("repro", "generate@0", timeout=RUN_TIMEOUT_S)
    return repo, yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]


def _outs(lock: dict, stage: str) -> list[tuple[str, str]]:
    return [(o["path"], o["md5"]) for o in lock[stage]["outs"]]


def _model_dir(lock: dict, stage: str) -> str:
    """The stage's one out under models/ (its DVCLive metrics file is another out)."""
    (path, _), = [out for out in _outs(lock, stage) if out[0].startswith("models/")]
    return path


def _changed(repo: Repo, target: str) -> dict:
    return json.loads(repo.dvc("status", "--with-deps", target, "--json").stdout or "{}")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["launch.processes=2"],
    ["model.device=auto"],
    ["launch.processes=8", "launch.main_process_port=29555", "model.device=cuda:1"],
    ["launch.processes=16", "launch.num_machines=2", "launch.main_process_ip=10.0.0.1",
     "launch.main_process_port=29500"],
])
def test_changing_only_the_launcher_or_the_device_reruns_nothing(repro, overrides):
    repo, _ = repro
    repo.compose_params(OVERRIDES + overrides)
    assert _changed(repo, "generate@0") == {}


@pytest.mark.slow
def test_two_processes_through_dvc_repro_make_the_outputs_of_one(repro):
    """Generation from the same adapters is the same bytes (the same dvc.lock hash); textual inversion
    and LoRA are the same weights up to float rounding (gradients summed over processes in another
    order), so their hashes match only when no sample's gradient is split differently."""
    repo, one = repro
    repo.compose_params(OVERRIDES + ["launch.processes=2"])
    weights = {stage: {f.name: load_file(f)
                       for f in sorted((repo.path / _model_dir(one, stage)).glob("*.safetensors"))}
               for stage in DIFFUSION[:2]}
    assert all(weights.values()), weights  # each adapter folder holds safetensors to compare
    shutil.rmtree(repo.path / _outs(one, "generate@0")[0][0])  # persist: true, -f would resume, not redo
    times = {}
    for stage in ("generate@0", *DIFFUSION[:2]):  # generation first, from the one-process adapters
        start = time.monotonic()
        done = repo.dvc("repro", "--force", "--single-item", stage, timeout=RUN_TIMEOUT_S)
        times[stage] = time.monotonic() - start
        assert "launch: 2 processes" in done.stderr, done.stderr[-2000:]
        assert done.stdout.count(f"{stage.split('@')[0]}: ") == 1  # one summary: process 0's
    two = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]
    assert _outs(two, "generate@0") == _outs(one, "generate@0")
    for stage, files in weights.items():
        path = _model_dir(two, stage)
        assert path == _model_dir(one, stage)
        assert sorted(f.name for f in (repo.path / path).glob("*.safetensors")) == sorted(files)
        for name, tensors in files.items():
            again = load_file(repo.path / path / name)
            assert again.keys() == tensors.keys()
            for key, value in tensors.items():
                torch.testing.assert_close(again[key], value, atol=1e-5, rtol=0)
    print("two processes, s per stage:", {k: round(v, 1) for k, v in times.items()})


@pytest.mark.slow
def test_queued_experiments_on_different_devices_both_succeed(repro):
    """`dvc queue start -j 2` runs two experiments side by side, model.device cpu and auto (the CPU
    stands in for two cards), up to a classifier (the cheapest stage that takes the device)."""
    repo, _ = repro
    target = "classify_real@0-resnet18"
    for device in ("cpu", "auto"):
        sets = [arg for o in [*OVERRIDES, f"model.device={device}"] for arg in ("-S", o)]
        repo.dvc("exp", "run", "--queue", "--force", *sets, "-n", f"on-{device}", target)
    status = repo.run_queue(jobs=2, timeout=RUN_TIMEOUT_S)
    lines = {name: line for line in status.splitlines() for name in ("on-cpu", "on-auto") if name in line}
    assert all("Success" in line for line in lines.values()) and len(lines) == 2, status
    for name in lines:
        assert "classify: resnet18 real seed 0" in repo.dvc("queue", "logs", name).stdout

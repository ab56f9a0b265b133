"""launch.processes > 1 re-runs a diffusion stage's command under `accelerate launch` (skinaug.launch),
and model.device picks one card (diffusion.pick_device). The pipeline-level checks (same outputs with two
processes through `dvc repro`, `dvc status` clean when only the launcher or the device changes, queued
experiments on different devices) are in tests/test_pipeline_launch.py."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from skinaug import SkinaugError, diffusion, launch

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
    """Records what relaunch_if_asked would exec instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda path, args: calls.append(args))
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_one_process_runs_in_place(repo_cfg, execs):
    launch.relaunch_if_asked(_with(repo_cfg, processes=1), ARGV)
    assert execs == []


def test_more_processes_replace_this_one_by_the_launcher(repo_cfg, execs):
    launch.relaunch_if_asked(_with(repo_cfg, processes=2), ARGV)
    assert execs == [launch.command(_with(repo_cfg, processes=2), ARGV)]


@pytest.mark.parametrize("variable", launch.LAUNCHER_VARIABLES)
def test_a_process_a_launcher_started_never_relaunches(repo_cfg, execs, monkeypatch, variable):
    monkeypatch.setenv(variable, "0")
    launch.relaunch_if_asked(_with(repo_cfg, processes=2), ARGV)
    assert execs == []


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
    assert diffusion.pick_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [1]  # accelerate's Accelerator, which says plain "cuda", lands there too


def test_a_card_that_does_not_exist_is_one_clear_error(cards):
    cards(2)
    with pytest.raises(SkinaugError) as err:
        diffusion.pick_device("cuda:2")
    assert str(err.value) == ("model.device is cuda:2 but this machine shows 2 CUDA device(s), cuda:0 to cuda:1; "
                              "pick one of those (or check CUDA_VISIBLE_DEVICES)")


def test_cuda_k_without_cuda_is_one_clear_error(cards):
    cards(0)
    with pytest.raises(SkinaugError, match=r"^device cuda:0 asked for but no CUDA device is visible; set model.device"):
        diffusion.pick_device("cuda:0")


def test_under_a_multi_process_launcher_the_launcher_picks_the_card(cards, monkeypatch):
    chosen = cards(4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert diffusion.pick_device("cuda:2") == torch.device("cuda")  # accelerate: one card per local rank
    assert chosen == []

"""Several processes per stage from params: `launch.processes` > 1 re-runs the command under `accelerate launch`.

    dvc exp run -S launch.processes=8        # textual inversion, LoRA and generation on 8 GPUs

`skinaug textual_inversion|lora|generate` read the `launch` section themselves and, when it asks
for more than one process and no launcher started them, run accelerate's launcher in their own
process (so DVC's Ctrl-C reaches it, and it stops the workers) instead of the stage:

    accelerate launch --multi_gpu --num_processes N ... -m skinaug <same arguments>

A worker's bad input shows as its own `Error: ...` line, then one line saying which processes
failed (exit status 1), not torchrun's traceback.

The stage's `cmd` and declared params stay the same, so DVC sees no change: N processes compute
what one process computes, training up to float rounding (finetune.py, generate.py). accelerate picks each process's card; with
`model.device: cuda:K` the processes of this machine take cards K, K+1, ... (`--gpu_ids`), so
queued experiments can share a node, a group of cards each. On CPUs the processes talk over gloo.

Across machines, every machine runs the same stage command at the same time; only the machine's
rank differs, so it comes from the environment (SKINAUG_MACHINE_RANK, default 0), not from params.
"""
from __future__ import annotations

import os
import re
import sys

from skinaug import SkinaugError
from skinaug.config import DEVICE_RE, Config, LaunchConfig

RANK_VARIABLE = "SKINAUG_MACHINE_RANK"  # this machine's rank when launch.num_machines > 1
LAUNCHER_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK")  # set by torchrun (accelerate launch) for every process


def launched() -> bool:
    """True inside a process some launcher started (ours, or `accelerate launch` by hand): never relaunch."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def machine_rank(launch: LaunchConfig) -> int:
    value = os.environ.get(RANK_VARIABLE, "0")
    if not value.isdigit() or int(value) >= launch.num_machines:
        raise SkinaugError(f"{RANK_VARIABLE} is {value!r}; allowed: 0 to {launch.num_machines - 1} "
                           f"(launch.num_machines {launch.num_machines}), this machine's rank")
    return int(value)


def gpu_ids(device: str, per_machine: int, device_count: int) -> str | None:
    """accelerate's --gpu_ids for model.device: cuda:K gives cards K..K+n-1 of this machine, else None (all)."""
    match = re.fullmatch(DEVICE_RE, device)
    if match is None:
        return None
    first = int(match.group(1))
    if first + per_machine > device_count:
        raise SkinaugError(f"model.device is {device} with {per_machine} processes on this machine: that needs "
                           f"cards {first} to {first + per_machine - 1}, and it has {device_count}; "
                           "pick a lower card, fewer launch.processes, or model.device cuda")
    return ",".join(str(k) for k in range(first, first + per_machine))


def command(cfg: Config, argv: list[str], device_count: int = 0, rank: int = 0) -> list[str]:
    """The `accelerate launch` command line that runs `skinaug <argv>` as cfg.launch asks."""
    launch = cfg.launch
    per_machine = launch.processes // launch.num_machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(launch.processes), "--num_machines", str(launch.num_machines),
           "--main_process_port", str(launch.main_process_port),
           # our own settings decide these (model.mixed_precision, generate.compile), not accelerate's config
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if launch.num_machines > 1:
        cmd += ["--machine_rank", str(rank), "--main_process_ip", launch.main_process_ip]
    ids = gpu_ids(cfg.model.device, per_machine, device_count)
    if ids is not None:
        cmd += ["--gpu_ids", ids]
    return [*cmd, "-m", "skinaug", *argv]


def relaunch_if_asked(cfg: Config, argv: list[str]) -> bool:
    """Run `skinaug <argv>` under `accelerate launch` when launch.processes > 1 and return True once every
    process has finished; False when this process should do the work itself."""
    if cfg.launch.processes == 1 or launched():
        return False
    count = 0
    if cfg.model.device.startswith("cuda"):  # checked here once, not in every launched process
        import torch

        from skinaug.diffusion import sd21  # torch: only when a card is named

        sd21.pick_device(cfg.model.device)
        count = torch.cuda.device_count()
    cmd = command(cfg, argv, count, machine_rank(cfg.launch))
    print(f"launch: {cfg.launch.processes} processes: accelerate launch {' '.join(cmd[3:])}", file=sys.stderr,
          flush=True)
    run_launcher(cmd[3:])
    return True


def run_launcher(args: list[str]) -> None:
    """`accelerate launch <args>` in this process; a failed or stopped worker is one SkinaugError line."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers' own errors say it
    try:
        launch_command(launch_command_parser().parse_args(args))
    except ChildFailedError as e:
        failed = ", ".join(f"{rank} (exit status {f.exitcode})" for rank, f in sorted(e.failures.items()))
        raise SkinaugError(f"launched process(es) {failed} failed; their errors are above") from None
    except SignalException as e:
        raise SkinaugError(f"stopped by {e.sigval.name}; the launched processes were stopped too") from None

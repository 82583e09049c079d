"""Data-parallel training over several processes: PyTorch DDP started by torchrun.

torchrun starts one process per GPU (or per CPU worker, with the gloo backend) and tells each
its place through environment variables. A plain `python stages/train.py` is a world of one,
where every function here is a no-op, so the training loop has a single code path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gptlab.errors import GptlabError
from gptlab.params import mps_processes_problem

# torchrun's grace between forwarding a stop signal and killing its workers (its default is 30
# s): a stop waits for the next log interval and a checkpoint of a large model.
STOP_GRACE_SECONDS = 600

# A rank that stops answering (killed, out of memory) fails the others after this long,
# instead of leaving them waiting forever in a collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0  # the process's index on its own machine: which GPU it drives
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """This process's place, as torchrun describes it (a world of one without torchrun)."""
    return World(rank=int(os.environ.get("RANK", 0)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                 size=int(os.environ.get("WORLD_SIZE", 1)))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc: int, device: torch.device, argv: list[str]) -> int:
    """Run this script (`argv`: its path and arguments) again as `nproc` processes on this
    machine, each training on `device`; return torchrun's exit code.

    For several machines, users start torchrun themselves (see the README) and the script,
    finding itself under torchrun, trains instead of relaunching.
    """
    check_processes_fit(nproc, device)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *argv]
    print(f"train.nproc={nproc}: {' '.join(command[1:])}", file=sys.stderr)
    # torchrun forwards Ctrl-C and SIGTERM to its workers, which checkpoint and stop; this
    # process must outlive them rather than leave them running on, orphaned.
    previous = {signum: signal.signal(signum, signal.SIG_IGN)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_GRACE_SECONDS), **os.environ}
    try:
        return subprocess.run(command, env=env).returncode
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_processes_fit(processes: int, device: torch.device) -> None:
    """Refuse, before any work, a world this machine cannot hold: more processes than GPUs,
    or several on Apple's MPS, which has no backend for the processes to talk over."""
    if processes > 1 and device.type == "mps":
        raise GptlabError(f"train.nproc: {mps_processes_problem(processes)}")
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise GptlabError(f"train.nproc: {processes} processes, but this machine has "
                          f"{torch.cuda.device_count()} GPU(s); one process drives one GPU")


def device_for_rank(device: torch.device, world: World) -> torch.device:
    """Each process drives its own GPU; CPU processes share the CPU."""
    if world.distributed:
        # Every process refuses MPS; each refuses a GPU index its machine does not have.
        check_processes_fit(world.size if device.type == "mps" else world.local_rank + 1,
                            device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the other processes for the duration of the block: NCCL on GPUs, gloo on CPU."""
    if not world.distributed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `value` over all processes (itself in a world of one)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether `flag` is set on any process: every process then takes the same branch."""
    if not world.distributed:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_all(obj: Any, world: World) -> list[Any]:
    """Every process's `obj`, in rank order, on every process (small objects only)."""
    if not world.distributed:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered

"""The processes of a multi-process job, as a launcher (torchrun) started them.

`torchrun --nproc-per-node N [--nnodes M ...] -m infinite_talk.cli generate ...` starts N×M copies of the command
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set. `world_from_env()` reads them (a plain start is
a world of one); `start_group()` joins the process group (NCCL between GPUs, gloo on the CPU) and builds the
sequence-parallel mesh on every process.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta

from ..errors import InfiniteTalkError, OptionError

# Followers wait for rank 0 between forwards (model loading, encoders, VAE decode, the next job's inputs).
GROUP_TIMEOUT = timedelta(minutes=30)


class PeerError(InfiniteTalkError):
    """Another process of the job failed or left; its own message is on its stderr."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        return f"process {self.rank} of {self.size}"


def world_from_env() -> World:
    """The launcher's world (RANK, WORLD_SIZE, LOCAL_RANK); a process started without a launcher is a world of one."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    try:
        size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise OptionError(f"the launcher's RANK/WORLD_SIZE/LOCAL_RANK are not integers ({err}); start the job with "
                          "torchrun") from err
    if size < 1 or not 0 <= rank < size:
        raise OptionError(f"the launcher set RANK={rank} with WORLD_SIZE={size}; start the job with torchrun")
    return World(rank, size, local)


def bind_device(world: World) -> None:
    """One GPU per process (cuda:LOCAL_RANK) as the current device, before anything touches CUDA memory."""
    import torch

    if world.size > 1 and torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)


def start_group(world: World, plan):
    """Join the job's process group and build the mesh for `plan` (planner.Plan); returns the `SequenceParallel`."""
    import torch
    import torch.distributed as dist

    from .sequence import SequenceParallel

    if not dist.is_initialized():
        device = torch.device(plan.device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(plan.dist_backend, rank=world.rank, world_size=world.size,
                                    timeout=GROUP_TIMEOUT, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise PeerError(f"{world.label()}: cannot join the job's process group ({plan.dist_backend}): {err}; "
                            "start every process with the same torchrun command") from err
    return SequenceParallel(plan.ulysses, plan.ring, plan.device)


def stop_group(leader: bool) -> None:
    """End a job that stopped cleanly: every process meets at a barrier (all are past their last collective), then
    rank 0 leaves the group. The others keep theirs and leave with `exit_process` (no teardown): tearing the gloo
    groups down on every process at once aborted now and then ("terminate called without an active exception",
    SIGABRT: 3 of 12 two-process runs on a loaded 2-core machine; 0 of 20 this way)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    if leader:
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Leave now with `code`, skipping the interpreter's teardown (and the process group's with it): for processes
    other than rank 0 of a job, which write nothing."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def raise_on_sigterm(message: str) -> None:
    """torchrun stops the other processes with SIGTERM when one fails: turn it into a `PeerError` so that rank 0
    ends the job as a failure (finished chunks kept, sidecar written) instead of dying mid-write."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise PeerError(message)

    signal.signal(signal.SIGTERM, handler)

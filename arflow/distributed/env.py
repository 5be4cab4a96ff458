"""Process-group setup shared by every backend and launcher.

`deepspeed`, `torchrun` and SLURM/Kubernetes templates all export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; a plain `python` run gets a one-process group on a free local port,
so the same code path (collectives, DCP, DeepSpeed) runs everywhere.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (rendezvous of single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(preference: str, local_rank: int) -> torch.device:
    """`preference` is "auto", "cuda" or "cpu"; "auto" takes the local GPU when there is one."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device is 'cuda' but CUDA is not available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join (or create) the default process group: nccl on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one machine each default to all cores; oversubscribed intra-op
        # threads make small CPU steps tens of times slower. Split the cores instead.
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leave the process group. The barrier first matters: with gloo, tearing the group down
    while a peer still finishes a DCP write aborts the process now and then. When DeepSpeed ran
    in this process it leaves through DeepSpeed, which then drops its own references to the
    group's subgroups (kept, they break a later group in the same process, e.g. a second run)."""
    if dist.is_initialized():
        dist.barrier()
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()

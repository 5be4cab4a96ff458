"""Exponential moving average of the fp32 master weights, in the backend's own layout.

The shadow tensors mirror `Backend.master_params()` one to one (full tensors under DDP,
DTensor shards under FSDP2, master-partition slices under DeepSpeed ZeRO), so the update is a
local lerp with no communication and the EMA costs what one fp32 master copy costs per rank.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, sources: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.sources = sources
        with torch.no_grad():
            self.shadow = {n: t.detach().float().clone() for n, t in sources.items()}

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, after each applied optimizer step."""
        for name, shadow in self.shadow.items():
            local_shard(shadow).lerp_(local_shard(self.sources[name]).float(), 1.0 - self.decay)

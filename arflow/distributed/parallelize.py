"""The parallelize step: the trainer's plain model in, a training backend out.

    backend = build_backend(model, cfg, info)

In torchtitan's order: each transformer block is prepared in place (activation checkpointing),
then the backend named by `parallel.backend` wraps or shards the model (DDP, `fully_shard` per
block, DeepSpeed ZeRO). Blocks keep their module and parameter names, so checkpoints and the
EMA see the plain model's names whatever was applied.
"""

from __future__ import annotations

import functools
import importlib

from torch import nn
from torch.utils.checkpoint import checkpoint

from arflow.config import Config
from arflow.distributed.backend import Backend
from arflow.distributed.env import DistInfo

# parallel.backend -> (module, class). A backend's module is imported only when it is chosen:
# importing DeepSpeed takes seconds and probes for accelerators.
BACKENDS: dict[str, tuple[str, str]] = {
    "ddp": ("arflow.distributed.native", "DDPBackend"),
    "fsdp2": ("arflow.distributed.native", "FSDP2Backend"),
    "deepspeed": ("arflow.distributed.zero", "DeepSpeedBackend"),
}


def checkpoint_blocks(module: nn.Module) -> None:
    """Recompute each transformer block's activations in backward. Only `forward` is wrapped,
    so parameter names (and checkpoints) stay those of the plain model."""
    for block in module.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_backend(
    module: nn.Module, cfg: Config, info: DistInfo, reshard_resume: bool = False
) -> Backend:
    """Parallelize `module` (on CPU, fp32, freshly initialised) with the configured backend.
    `reshard_resume`: the run will load a checkpoint written with another world size or ZeRO
    stage (DeepSpeed must know before it builds its optimizer)."""
    if cfg.parallel.activation_checkpointing:
        checkpoint_blocks(module)
    module_name, class_name = BACKENDS[cfg.parallel.backend]
    backend = getattr(importlib.import_module(module_name), class_name)
    return backend(module, cfg, info, reshard_resume=reshard_resume)

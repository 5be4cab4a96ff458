"""The parallelize step: the trainer's plain model in, a training backend out.

    backend = build_backend(model, cfg, info)

In torchtitan's order: each transformer block is prepared in place (activation checkpointing,
then torch.compile), then the backend named by `parallel.backend` wraps or shards the model
(DDP, `fully_shard` per block, DeepSpeed ZeRO). Blocks keep their module and parameter names,
so checkpoints and the EMA see the plain model's names whatever was applied.
"""

from __future__ import annotations

import functools
import importlib

import torch
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


def compile_enabled(cfg: Config, device: torch.device) -> bool:
    """`parallel.compile` resolved: "auto" is on for CUDA, except under DeepSpeed ZeRO-3."""
    p = cfg.parallel
    if p.compile == "auto":
        return device.type == "cuda" and not (p.backend == "deepspeed" and p.zero_stage == 3)
    return p.compile


def compile_blocks(module: nn.Module) -> None:
    """torch.compile the `forward` of each transformer block and of the final layer, each as
    one graph (fullgraph: a graph break, e.g. a host sync inside a block, is an error rather
    than a slow path). Every block has the same code and shapes, so one compiled graph serves
    them all. Only `forward` is replaced: the modules, their parameter names and state dicts
    stay the plain model's, hooks the backend adds later (fully_shard's gathers, DeepSpeed's)
    run around the compiled code, and activation checkpointing applied before is compiled
    with the block (its recomputation is part of the graph)."""
    for m in [*module.blocks, module.final_layer]:
        m.forward = torch.compile(m.forward, fullgraph=True)


def build_backend(
    module: nn.Module, cfg: Config, info: DistInfo, reshard_resume: bool = False
) -> Backend:
    """Parallelize `module` (on CPU, fp32, freshly initialised) with the configured backend.
    `reshard_resume`: the run will load a checkpoint written with another world size or ZeRO
    stage (DeepSpeed must know before it builds its optimizer)."""
    if cfg.parallel.activation_checkpointing:
        checkpoint_blocks(module)
    if compile_enabled(cfg, info.device):
        compile_blocks(module)
    module_name, class_name = BACKENDS[cfg.parallel.backend]
    backend = getattr(importlib.import_module(module_name), class_name)
    return backend(module, cfg, info, reshard_resume=reshard_resume)

"""Full fp32 weights out of a trainer checkpoint, offline (no process group, any backend).

Used by tools/convert_ckpt.py. DeepSpeed checkpoints hold the EMA consolidated and the master
weights in ZeRO's partitioned files (read with DeepSpeed's own zero_to_fp32); DDP / FSDP2
checkpoints are DCP, from which only the requested tensors are read.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp

from arflow.config import ModelConfig
from arflow.distributed.checkpoint import CheckpointManager, fetch
from arflow.models import ARFlow
from arflow.models.pretrained import architecture_of


def read_trainer_checkpoint(
    ckpt: str, use_ema: bool = True
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """`ckpt`: a step directory or a checkpoint root (its newest complete step); local or URL.
    Returns (state dict of the EMA or the raw weights, constructor arguments, training config)."""
    found = CheckpointManager(ckpt, info=None, keep_last=1).find(ckpt)
    config = found.meta["config"]
    model = ARFlow(**ModelConfig(**config["model"]).architecture())
    state = model.state_dict()  # frozen tensors (the positional table) come from here
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    path, _, cleanup = fetch(found)
    try:
        if config["parallel"]["backend"] == "deepspeed":
            if use_ema:
                from safetensors.torch import load_file

                loaded = load_file(os.path.join(path, "ema.safetensors"))
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                loaded = get_fp32_state_dict_from_zero_checkpoint(path, tag="zero")
        else:
            key = "ema" if use_ema else "model"
            names = trainable if use_ema else list(state)
            template = {key: {n: torch.empty_like(state[n]) for n in names}}
            dcp.load(template, checkpoint_id=path)  # reads only these tensors
            loaded = template[key]
    finally:
        cleanup()
    missing = set(trainable) - set(loaded)
    if missing:
        raise KeyError(f"checkpoint {found.url} lacks {sorted(missing)[:5]}")
    state.update({n: loaded[n].float() for n in state if n in loaded})
    return state, architecture_of(model), config

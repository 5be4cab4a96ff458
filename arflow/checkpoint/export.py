"""Full fp32 weights out of a trainer checkpoint, offline (no process group, any backend).

Used by tools/convert_ckpt.py. Every checkpoint holds its EMA as a self-describing
`ema.safetensors`; the raw (master) weights live in the backend's files: DeepSpeed's ZeRO
folder (read with DeepSpeed's own zero_to_fp32, after each file is vetted) or torch DCP (only
the requested tensors are read). Files are checked against the checkpoint's checksums first.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp

from arflow.checkpoint.layout import CheckpointError
from arflow.checkpoint.locate import find_checkpoint
from arflow.checkpoint.verify import verify
from arflow.config import ModelConfig
from arflow.distributed.dcp_io import SafeFileSystemReader, SafeLoadPlanner
from arflow.models import ARFlow
from arflow.models.pretrained import EMA_FILE, architecture_of, read_metadata
from arflow.utils.safe_load import check_torch_file


class TrainerWeights(NamedTuple):
    state: dict[str, torch.Tensor]  # the EMA or the raw (master) weights, fp32
    arch: dict  # constructor arguments
    config: dict  # the training config
    step: int  # the training step of the checkpoint


def read_trainer_checkpoint(
    ckpt: str, use_ema: bool = True, storage_options: dict | None = None
) -> TrainerWeights:
    """`ckpt`: a step directory or a checkpoint root (the checkpoint `--resume auto` would
    take); local or URL. A damaged checkpoint raises CheckpointError naming the file."""
    found = find_checkpoint(ckpt, storage_options)
    problems = verify(found)
    try:
        if problems:
            raise CheckpointError(
                f"checkpoint {found.url} (step {found.step}) is damaged: {'; '.join(problems)}"
            )
        config = found.meta["config"]
        if use_ema:
            path = os.path.join(found.local, EMA_FILE)
            from safetensors.torch import load_file

            arch = read_metadata(path)["architecture"]
            return TrainerWeights(load_file(path), arch, config, found.step)
        model = ARFlow(**ModelConfig(**config["model"]).architecture())
        state = model.state_dict()  # frozen tensors (the positional table) come from here
        if config["parallel"]["backend"] == "deepspeed":
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            zero = os.path.join(found.local, "zero")
            for name in sorted(os.listdir(zero)):
                if name.endswith(".pt"):
                    check_torch_file(os.path.join(zero, name))
            loaded = get_fp32_state_dict_from_zero_checkpoint(found.local, tag="zero")
        else:
            template = {"model": {n: torch.empty_like(t) for n, t in state.items()}}
            dcp.load(  # reads only these tensors
                template,
                storage_reader=SafeFileSystemReader(found.local),
                planner=SafeLoadPlanner(),
            )
            loaded = template["model"]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = set(trainable) - set(loaded)
        if missing:
            raise KeyError(f"checkpoint {found.url} lacks {sorted(missing)[:5]}")
        state.update({n: loaded[n].float() for n in state if n in loaded})
        return TrainerWeights(state, architecture_of(model), config, found.step)
    finally:
        found.release()

"""DeepSpeed ZeRO stage 1, 2 or 3, configured from our schema (no hand-written DeepSpeed JSON).

Precision: with bf16 the module holds bf16 parameters and DeepSpeed keeps the fp32 master
weights and AdamW moments partitioned across ranks; with fp32 both are fp32.

EMA: it tracks DeepSpeed's fp32 master weights, not the bf16 module copies, so it has the
layout of the master partition. Under ZeRO-3 that is each parameter's flat local partition
(sharded exactly like the parameters); under ZeRO-1/2 it is the fragment of the flat fp32
partition that this rank owns. Either way the update needs no communication and costs 1/world
of a full copy per rank; the checkpoint holds it consolidated (`ema.safetensors`), so it can be
re-sliced for any world size, and it is gathered only to sample or evaluate.

Resuming on another number of processes goes through DeepSpeed's universal checkpoint: the
saved ZeRO checkpoint is converted once (by rank 0, next to it) and loaded with
`load_universal`.
"""

from __future__ import annotations

import json
import math
import os

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from arflow.config import Config
from arflow.distributed.backend import (
    Backend,
    LossFn,
    StepResult,
    checkpoint_blocks,
    make_optimizer,
    mean_across_ranks,
    param_groups,
)
from arflow.distributed.env import DistInfo

TAG = "zero"
UNIVERSAL_TAG = "zero_universal"


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose step can be vetoed. DeepSpeed detects non-finite gradients only in fp16
    mode; under bf16/fp32 it would apply the step, so the backend decides (the same way on
    every rank) and ZeRO's call to `step` becomes a no-op for that step."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def deepspeed_config(cfg: Config, world_size: int, dtype: torch.dtype, universal: bool) -> dict:
    """DeepSpeed's JSON config, generated from ours."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation(world_size),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(),
        },
        # Our AdamW subclass (see SkippableAdamW) is not on DeepSpeed's list of tested ones.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(
        self, module: nn.Module, cfg: Config, info: DistInfo, universal_resume: bool = False
    ):
        super().__init__(module, cfg, info)
        self.stage = cfg.parallel.zero_stage
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(module)
        if self.dtype != torch.float32:
            # The module holds bf16 weights; inputs (images, noise levels) arrive in fp32.
            module.register_forward_pre_hook(self._cast_inputs)
        self.optimizer = make_optimizer(
            param_groups(module, cfg.optim.weight_decay), cfg, SkippableAdamW
        )
        self.ds_config = deepspeed_config(cfg, info.world_size, self.dtype, universal_resume)
        self.model, _, _, _ = deepspeed.initialize(
            model=module.to(info.device), optimizer=self.optimizer, config=self.ds_config
        )
        self.module = self.model.module
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def _cast_inputs(self, module, args):
        return tuple(
            a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
        )

    def train_step(self, batches, loss_fn: LossFn, lr: float) -> StepResult:
        losses = []
        for i, (x, y) in enumerate(batches):
            loss = loss_fn(self.model, x, y)
            losses.append(loss.detach().float())
            if i == len(batches) - 1:
                # Decided before the step, identically on every rank (one all-reduce).
                loss_mean = mean_across_ranks(torch.stack(losses).mean())
                self.optimizer.skip = not math.isfinite(loss_mean)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.model.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps
            self.model.step()  # applies the update on the last micro-batch only
        grad_norm = self.model.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult(loss_mean, grad_norm, skipped=self.optimizer.skip)

    # ------------------------------------------------------------------------------- EMA
    def master_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.trainable.items():
            if self.stage == 3:
                out[name] = deepspeed.utils.safe_get_local_fp32_param(p)
            elif p._hp_mapping is not None:
                # The public safe_get_* helpers gather the full tensor (an all-reduce per
                # parameter); the fragment view is the same data without communication.
                out[name] = p._hp_mapping.get_hp_fragment()
            else:
                out[name] = torch.empty(0, device=self.info.device)  # no fragment on this rank
        return out

    def _fragment(self, p: nn.Parameter) -> tuple[int, int]:
        """(start, numel) of this rank's master fragment inside the flattened parameter."""
        if self.stage == 3:
            part = p.ds_tensor.numel()
            return self.info.rank * part, part
        if p._hp_mapping is None:
            return 0, 0
        address = p._hp_mapping.lp_fragment_address
        return address.start, address.numel

    @torch.no_grad()
    def gather_full(self, tensors):
        full = {}
        for name, local in tensors.items():
            p = self.trainable[name]
            if self.stage == 3:
                buf = torch.empty(
                    local.numel() * self.info.world_size, dtype=local.dtype, device=local.device
                )
                dist.all_gather_into_tensor(buf, local.detach().clone())
                full[name] = buf[: p.ds_numel].view(p.ds_shape)
            else:
                start, numel = self._fragment(p)
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=self.info.device)
                buf[start : start + numel] = local.view(-1)
                dist.all_reduce(buf)  # fragments are disjoint: the sum assembles the tensor
                full[name] = buf.view(p.shape)
        return full

    def _local_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        p = self.trainable[name]
        start, numel = self._fragment(p)
        flat = full.reshape(-1).float()
        if self.stage == 3:
            flat = torch.nn.functional.pad(flat, (0, numel * self.info.world_size - flat.numel()))
        return flat[start : start + numel]

    # ------------------------------------------------------------------------ checkpoints
    def save(self, path, ema):
        self.model.save_checkpoint(path, tag=TAG, save_latest=False)
        full = self.gather_full(ema)
        if self.info.is_main:
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in full.items()},
                os.path.join(path, "ema.safetensors"),
            )
            with open(os.path.join(path, "deepspeed_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=2)

    def load(self, path, ema, reshard, shared):
        tag = TAG
        if reshard:
            tag = UNIVERSAL_TAG
            converter = self.info.is_main if shared else True
            if converter and not os.path.isdir(os.path.join(path, UNIVERSAL_TAG)):
                _to_universal(os.path.join(path, TAG), os.path.join(path, UNIVERSAL_TAG))
            dist.barrier()
        self.model.load_checkpoint(
            path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        saved = load_file(os.path.join(path, "ema.safetensors"), device=str(self.info.device))
        with torch.no_grad():
            for name, local in ema.items():
                local.copy_(self._local_slice(name, saved[name]))


def _to_universal(src: str, dst: str) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    tmp = dst + ".tmp"
    main(
        Namespace(
            input_folder=src,
            output_folder=tmp,
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )
    os.replace(tmp, dst)  # a crash mid-conversion leaves no half-converted folder behind

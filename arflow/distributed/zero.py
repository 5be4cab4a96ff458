"""DeepSpeed ZeRO stage 1, 2 or 3, configured from our schema (no hand-written DeepSpeed JSON).

Precision: with bf16 the module holds bf16 parameters and DeepSpeed keeps the fp32 master
weights and AdamW moments partitioned across ranks; with fp32 both are fp32.

EMA: it tracks DeepSpeed's fp32 master weights, not the bf16 module copies, so it has the
layout of the master partition. Under ZeRO-3 that is each parameter's flat local partition
(sharded exactly like the parameters); under ZeRO-1/2 it is the fragment of the flat fp32
partition that this rank owns. Either way the update needs no communication and costs 1/world
of a full copy per rank; the checkpoint holds it consolidated (`ema.safetensors`), so it can be
re-sliced for any world size, and it is gathered only to sample or evaluate.

Resuming on another number of processes or another ZeRO stage (1, 2 or 3, either way) goes
through DeepSpeed's universal checkpoint: every save records the `universal_checkpoint_info`
the converter requires; at such a resume the ZeRO folder is converted (by rank 0 when the
directory is shared, next to it; deleted after loading) and loaded with `load_universal`.
Data order and random streams cannot be split the same way across another number of
processes, so losses after such a resume differ from an uninterrupted run's; a stage change
on the same processes continues exactly.

What this needs of DeepSpeed's internals lives in arflow.internals.deepspeed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grad_value_

from arflow.config import Config
from arflow.distributed.backend import (
    Backend,
    LossFn,
    StepResult,
    make_optimizer,
    param_groups,
    step_decision,
)
from arflow.distributed.env import DistInfo
from arflow.internals import deepspeed as ds
from arflow.utils.safe_load import check_torch_file

TAG = "zero"
UNIVERSAL_TAG = "zero_universal"


class ZeroAdamW(torch.optim.AdamW):
    """AdamW as ZeRO calls it: on this rank's partition of the fp32 master weights, whose
    `.grad` holds the partition of the reduced (averaged) gradient (ZeRO-1/2: the flat fp32
    partition of each group; ZeRO-3: each sub-group's flat partition), after DeepSpeed's own
    norm clipping. DeepSpeed calls `step` once per group (or sub-group) of each optimizer step,
    after it has computed the global gradient norm. Two additions:

    - `decide`, set by the backend before each optimizer step, is called at the first of those
      calls and returns whether to skip the update (the same on every rank): the whole
      optimizer step is then skipped or applied.
    - `clip_value` > 0 clamps those gradients to [-clip_value, clip_value] first. DeepSpeed
      clips only by norm; clipping by value is element-wise, so clamping each rank's partition
      of the reduced gradient equals clamping the full gradient.
    """

    decide: Callable[[], bool] | None = None
    skip = False
    clip_value = 0.0

    def step(self, closure=None):
        if self.decide is not None:
            self.skip, self.decide = self.decide(), None
        if self.skip:
            return None
        if self.clip_value > 0:
            clip_grad_value_([p for g in self.param_groups for p in g["params"]], self.clip_value)
        return super().step(closure)


def deepspeed_config(cfg: Config, world_size: int, dtype: torch.dtype, universal: bool) -> dict:
    """DeepSpeed's JSON config, generated from ours."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation(world_size),
        # DeepSpeed clips by norm only; value clipping happens in ZeroAdamW.
        "gradient_clipping": t.grad_clip if t.grad_clip_mode == "norm" else 0.0,
        # DeepSpeed's own non-finite check off: the backend's step decision covers it.
        "bf16": {"enabled": dtype == torch.bfloat16, **ds.BF16_NO_OVERFLOW_CHECK},
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(),
        },
        # Our AdamW subclass (see ZeroAdamW) is not on DeepSpeed's list of tested ones.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(
        self, module: nn.Module, cfg: Config, info: DistInfo, reshard_resume: bool = False
    ):
        super().__init__(module, cfg, info, reshard_resume)
        self.stage = cfg.parallel.zero_stage
        if self.dtype != torch.float32:
            # The module holds bf16 weights; inputs (images, noise levels) arrive in fp32.
            module.register_forward_pre_hook(self._cast_inputs)
        self.optimizer = make_optimizer(
            param_groups(module, cfg.optim.weight_decay), cfg, ZeroAdamW
        )
        if cfg.train.grad_clip_mode == "value":
            self.optimizer.clip_value = cfg.train.grad_clip
        self.hparams = [  # the lr is set at every step
            {k: v for k, v in g.items() if k in ("weight_decay", "betas", "eps")}
            for g in self.optimizer.param_groups
        ]
        self.ds_config = deepspeed_config(cfg, info.world_size, self.dtype, reshard_resume)
        self.model, _, _, _ = deepspeed.initialize(
            model=module.to(info.device), optimizer=self.optimizer, config=self.ds_config
        )
        self.module = self.model.module
        ds.check_engine(self.model, self.stage)
        if info.device.type == "cpu":
            ds.release_shared_memory_name(info.rank)
        # Recorded in every save, so any checkpoint reshards.
        ds.record_universal_checkpoint_info(self.module)
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def _cast_inputs(self, module, args):
        return tuple(
            a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
        )

    def train_step(self, batches, loss_fn: LossFn, lr: float, stop=None) -> StepResult:
        losses, decision = [], {}
        for i, (x, y) in enumerate(batches):
            loss = loss_fn(self.model, x, y)
            losses.append(loss.detach().float())
            self.model.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps
            if i == len(batches) - 1:
                loss_mean = torch.stack(losses).mean()
                self.optimizer.decide = functools.partial(self._decide, loss_mean, stop, decision)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.model.step()  # applies the update on the last micro-batch only
        if not decision:
            # DeepSpeed skipped the update itself (its own check of the norm, fp32 or ZeRO-3)
            # without calling the optimizer; the same on every rank (the norm is global).
            self.optimizer.decide = None
            _, decision["stop"] = step_decision(~torch.isfinite(loss_mean), stop)
            decision["skip"] = True
        return StepResult(loss_mean, self._grad_norm(), decision["skip"], decision["stop"])

    def _decide(self, loss: torch.Tensor, stop, decision: dict) -> bool:
        """The step's decision, called by ZeroAdamW inside DeepSpeed's step: gradients reduced,
        global norm known, no update applied yet; a non-finite gradient makes the norm
        non-finite."""
        norm = ds.global_grad_norm(self.model.optimizer)
        finite = torch.isfinite(loss)
        if torch.is_tensor(norm):
            finite &= torch.isfinite(norm)
        decision["skip"], decision["stop"] = step_decision(~finite, stop)
        return decision["skip"]

    def _grad_norm(self) -> torch.Tensor:
        """DeepSpeed's global gradient norm of the last step as a () fp32 device tensor, without
        reading it (a tensor, or a float when it skipped the step itself; nan if not computed)."""
        norm = self.model.get_global_grad_norm()
        if torch.is_tensor(norm):
            return norm.detach().float().reshape(())
        value = float("nan") if norm is None else norm
        return torch.full((), value, dtype=torch.float32, device=self.info.device)

    # ------------------------------------------------------------------------------- EMA
    def master_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.trainable.items():
            if self.stage == 3:
                out[name] = deepspeed.utils.safe_get_local_fp32_param(p)
                continue
            # The public safe_get_* helpers gather the full tensor (an all-reduce per
            # parameter); the fragment view is the same data without communication.
            fragment = ds.fragment(p)
            if fragment is None:  # no fragment on this rank
                out[name] = torch.empty(0, device=self.info.device)
            else:
                out[name] = fragment.master
        return out

    def _fragment(self, p: nn.Parameter) -> tuple[int, int]:
        """(start, numel) of this rank's master fragment inside the flattened parameter."""
        if self.stage == 3:
            part = ds.partition(p).local
            return self.info.rank * part, part
        fragment = ds.fragment(p)
        return (0, 0) if fragment is None else (fragment.start, fragment.numel)

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
                part = ds.partition(p)
                full[name] = buf[: part.numel].view(part.shape)
            else:
                start, numel = self._fragment(p)
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=self.info.device)
                buf[start : start + numel] = local.view(-1)
                dist.all_reduce(buf)  # fragments are disjoint: the sum assembles the tensor
                full[name] = buf.view(p.shape)
        return full

    def shard_full(self, tensors):
        out = {}
        for name, full in tensors.items():
            p = self.trainable[name]
            start, numel = self._fragment(p)
            flat = full.reshape(-1).float().to(self.info.device)
            if self.stage == 3:  # ZeRO-3 pads each flat parameter to a multiple of the world
                flat = torch.nn.functional.pad(
                    flat, (0, numel * self.info.world_size - flat.numel())
                )
            out[name] = flat[start : start + numel]
        return out

    # ------------------------------------------------------------------------ checkpoints
    def stage_state(self, path, stage):
        # DeepSpeed hands every file it saves to its checkpoint engine: here each is kept (its
        # state dict copied by `stage` into host memory, keyed by the file's path inside the
        # checkpoint, so host buffers are reused from save to save) and the writer writes them
        # later, hashing on the way out. DeepSpeed's own direct writes (its recovery script)
        # land in `path` now.
        files: list[tuple[dict, str]] = []

        def keep(state_dict: dict, file: str) -> None:
            if stage is not None:
                state_dict = stage(state_dict, os.path.relpath(file, path))
            files.append((state_dict, file))

        with ds.saves_intercepted(self.model, keep):
            self.model.save_checkpoint(path, tag=TAG, save_latest=False)
        config = json.dumps(self.ds_config, indent=2).encode() if self.info.is_main else None

        def write(recorder, group):
            for state_dict, file in files:
                with recorder.open(file) as f:
                    torch.save(state_dict, f)
            if config is not None:
                with recorder.open("deepspeed_config.json") as f:
                    f.write(config)

        return write

    def load_state(self, path, reshard, shared):
        # DeepSpeed unpickles its files with weights_only=False: each is vetted first.
        for name in sorted(os.listdir(os.path.join(path, TAG))):
            if name.endswith(".pt"):
                check_torch_file(os.path.join(path, TAG, name))
        tag = TAG
        universal = os.path.join(path, UNIVERSAL_TAG)
        converter = reshard and (self.info.is_main or not shared)
        if converter:
            _to_universal(os.path.join(path, TAG), universal)
            ds.match_universal_stage(universal, self.stage)
        if reshard:
            dist.barrier()
            tag = UNIVERSAL_TAG
        try:
            self.model.load_checkpoint(
                path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            # ZeRO-3's universal loader gives every parameter group the first group's
            # hyper-parameters (weight decay on norms and biases): ours come from the config.
            # It also gives every group the same `step` tensor, which AdamW increments in place
            # once per group: each group gets its own.
            for group, hparams in zip(self.optimizer.param_groups, self.hparams, strict=True):
                group.update(hparams)
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        finally:
            if reshard:
                dist.barrier()
                if converter:  # derived data: the committed checkpoint stays as it was written
                    shutil.rmtree(universal, ignore_errors=True)
                    latest = os.path.join(path, "latest_universal")
                    if os.path.exists(latest):
                        os.remove(latest)


def _to_universal(src: str, dst: str) -> None:
    """DeepSpeed's universal checkpoint (one folder per parameter, any world size or stage)
    from a ZeRO checkpoint; written fresh under a temporary name, so no half-converted or stale
    folder is ever loaded."""
    tmp = dst + ".tmp"
    for leftover in (tmp, dst):
        shutil.rmtree(leftover, ignore_errors=True)
    ds.convert_to_universal(src, tmp)
    os.replace(tmp, dst)

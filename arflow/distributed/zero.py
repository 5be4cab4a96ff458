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
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    DS_VERSION,
    OPTIMIZER_STATE_DICT,
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
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
from arflow.utils.safe_load import check_torch_file, deepspeed_classes, load_torch_file

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
        "bf16": {"enabled": dtype == torch.bfloat16, **_no_overflow_check()},
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


def _no_overflow_check() -> dict:
    """DeepSpeed's own bf16 non-finite gradient check off: it reads two values on the host per
    step, and the backend's decision covers the gradient anyway (through the global norm, in
    the step's one exchange). Older DeepSpeed versions have neither the check nor the key."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return {}
    return (
        {"check_grad_overflow": False}
        if "check_grad_overflow" in DeepSpeedBF16Config.model_fields
        else {}
    )


def release_shared_memory_name(rank: int) -> None:
    """DeepSpeed's CPU communication backend maps one ~70 MB shared-memory buffer per rank (for
    an all-reduce the trainer never calls) when all ranks share a machine, and never unlinks its
    name: every run would leave world_size buffers in /dev/shm until the machine's memory runs
    out. Each rank has mapped every peer's buffer by the time `deepspeed.initialize` returns, so
    after a barrier each rank drops the name of its own (the mappings stay valid)."""
    dist.barrier()
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        )
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


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
        if info.device.type == "cpu":
            release_shared_memory_name(info.rank)
        # What DeepSpeed's universal-checkpoint converter requires in a ZeRO-1/2 checkpoint
        # (it refuses one without it): recorded in every save, so any checkpoint reshards.
        setattr(
            self.module,
            UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        )
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
        global norm known, no update applied yet. `_global_grad_norm` is the ZeRO optimizer's
        norm of this step (the engine's public copy is refreshed only after the step); a
        non-finite gradient makes it non-finite."""
        norm = self.model.optimizer._global_grad_norm
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
        # DeepSpeed hands every file it saves to its checkpoint engine: ours keeps the state
        # dicts (copied by `stage` into host memory) and the writer writes them later, hashing
        # on the way out. DeepSpeed's own direct writes (its recovery script) land in `path` now.
        engine = self.model.checkpoint_engine
        staging = _StagingEngine(engine, path, stage)
        self.model.checkpoint_engine = staging
        try:
            self.model.save_checkpoint(path, tag=TAG, save_latest=False)
        finally:
            self.model.checkpoint_engine = engine
        config = json.dumps(self.ds_config, indent=2).encode() if self.info.is_main else None

        def write(recorder, group):
            for state_dict, file in staging.files:
                with recorder.open(file) as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=staging.zipfile)
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
            _match_stage(universal, self.stage)
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


class _StagingEngine:
    """DeepSpeed's checkpoint engine with `save` keeping (state dict, path) for a later write,
    the state dict copied by `stage` (keyed by the file's path inside the checkpoint, so its
    host buffers are reused from save to save); everything else is the wrapped engine's."""

    def __init__(self, inner, root: str, stage):
        self._inner = inner
        self._root = root
        self._stage = stage
        self.files: list[tuple[dict, str]] = []
        self.zipfile = getattr(inner, "zipfile_serialization", True)

    def save(self, state_dict, path: str) -> None:
        if self._stage is not None:
            state_dict = self._stage(state_dict, os.path.relpath(path, self._root))
        self.files.append((state_dict, path))

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _to_universal(src: str, dst: str) -> None:
    """DeepSpeed's universal checkpoint (one folder per parameter, any world size or stage)
    from a ZeRO checkpoint; written fresh under a temporary name, so no half-converted or stale
    folder is ever loaded."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    tmp = dst + ".tmp"
    for leftover in (tmp, dst):
        shutil.rmtree(leftover, ignore_errors=True)
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
    os.replace(tmp, dst)


def _match_stage(folder: str, stage: int) -> None:
    """Make a universal checkpoint converted from one ZeRO family (1/2 or 3) loadable by the
    other. DeepSpeed writes it in the source's layout and reads only the target's: the
    model-states file name, where the Adam step lives (a `step.pt` per parameter for ZeRO-1/2,
    the global optimizer state for ZeRO-3), the version tag ZeRO-1/2 requires and the wrapping
    of each tensor file differ. The tensors themselves (fp32, exp_avg, exp_avg_sq per
    parameter, full size) are the same."""
    zero = os.path.join(folder, "zero")
    state_path = os.path.join(zero, "optimizer_state.pt")
    state = load_torch_file(state_path, deepspeed_classes())
    from_stage3 = OPTIMIZER_STATE_DICT in state
    if (stage == 3) == from_stage3:
        return
    params = [d.path for d in os.scandir(zero) if os.path.isfile(os.path.join(d, "fp32.pt"))]
    stage12_states = "mp_rank_00_model_states.pt"
    stage3_states = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if stage == 3:
        step = load_torch_file(os.path.join(params[0], "step.pt"))
        state[OPTIMIZER_STATE_DICT] = {
            "state": {0: {"step": step}},
            "param_groups": state["param_groups"],
        }
        shutil.copyfile(os.path.join(folder, stage12_states), os.path.join(folder, stage3_states))
    else:
        step = state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for param in params:
            torch.save(step, os.path.join(param, "step.pt"))
            for key in ("fp32", "exp_avg", "exp_avg_sq"):  # ZeRO-3 stores bare tensors
                path = os.path.join(param, f"{key}.pt")
                tensor = load_torch_file(path)
                if torch.is_tensor(tensor):
                    torch.save({"param": tensor}, path)
        state.setdefault(DS_VERSION, deepspeed.__version__)
        shutil.copyfile(os.path.join(folder, stage3_states), os.path.join(folder, stage12_states))
    torch.save(state, state_path)

"""PyTorch-native backends: DDP (replicated) and FSDP2 (`fully_shard` per block and root).

Both keep fp32 parameters as the master copy, run compute in bf16 on GPU (autocast for DDP,
FSDP2's MixedPrecisionPolicy), use torch's AdamW, and checkpoint with torch.distributed.checkpoint
(DCP), which writes each rank's shard once and reshards on load, so a run may resume on a
different number of processes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_value_, clip_grads_with_norm_, get_total_norm

from arflow.config import Config
from arflow.distributed.backend import (
    Backend,
    LossFn,
    StepResult,
    make_optimizer,
    param_groups,
    step_decision,
)
from arflow.distributed.dcp_io import RecordingWriter, SafeFileSystemReader, SafeLoadPlanner
from arflow.distributed.env import DistInfo


class NativeBackend(Backend):
    """Shared step and DCP checkpointing; subclasses wrap the module and pick the autocast."""

    def __init__(
        self, module: nn.Module, cfg: Config, info: DistInfo, reshard_resume: bool = False
    ):
        super().__init__(module, cfg, info, reshard_resume)
        self.module = module
        self.model = self.parallelize(module.to(info.device))
        self.optimizer = make_optimizer(param_groups(module, cfg.optim.weight_decay), cfg)
        self.trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def parallelize(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def autocast(self):
        return contextlib.nullcontext()

    def sync_gradients(self, last_micro_batch: bool):
        """Context for one micro-batch's backward: reduce gradients only on the last one."""
        return contextlib.nullcontext()

    def train_step(self, batches, loss_fn: LossFn, lr: float, stop=None) -> StepResult:
        losses = []
        for i, (x, y) in enumerate(batches):
            with self.sync_gradients(i == len(batches) - 1):
                with self.autocast():
                    loss = loss_fn(self.model, x, y)
                (loss / len(batches)).backward()
            losses.append(loss.detach().float())
        params = list(self.trainable.values())
        norm = get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        loss = torch.stack(losses).mean()
        skip, stop = step_decision(~(torch.isfinite(loss) & torch.isfinite(norm)), stop)
        if not skip:
            clip, mode = self.cfg.train.grad_clip, self.cfg.train.grad_clip_mode
            if clip > 0 and mode == "norm":
                clip_grads_with_norm_(params, clip, norm)
            elif clip > 0:
                clip_grad_value_(params, clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm.detach().float(), skip, stop)

    # ------------------------------------------------------------------------------- EMA
    def master_params(self) -> dict[str, torch.Tensor]:
        return self.trainable

    @torch.no_grad()
    def gather_full(self, tensors):
        return {
            n: (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            for n, t in tensors.items()
        }

    def shard_full(self, tensors):
        out = {}
        for name, full in tensors.items():
            mine = self.trainable[name]
            if isinstance(mine, DTensor):
                # Each rank slices its own shard out of the full tensor (no communication).
                full = distribute_tensor(
                    full.to(mine.device_mesh.device_type),
                    mine.device_mesh,
                    mine.placements,
                    src_data_rank=None,
                )
            out[name] = full
        return out

    # ------------------------------------------------------------------------ checkpoints
    def _state(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def stage_state(self, path, stage):
        state = self._state() if stage is None else stage(self._state(), "dcp")

        def write(recorder, group):
            dcp.save(state, storage_writer=RecordingWriter(path, recorder), process_group=group)

        return write

    def load_state(self, path, reshard, shared):
        state = self._state()
        # In place, resharding as needed; metadata and non-tensor items read weights-only.
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


class DDPBackend(NativeBackend):
    name = "ddp"

    def parallelize(self, module):
        device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        # Autocast keeps the fp32 parameters as master weights; DDP reduces fp32 gradients.
        return DistributedDataParallel(module, device_ids=device_ids)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.dtype)

    def sync_gradients(self, last_micro_batch):
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()


class FSDP2Backend(NativeBackend):
    """Every block is its own FSDP unit (gathered just before it runs, freed after) and the
    root holds the embeddings and final layer. The EMA is a DTensor with the parameter's
    placement: sharded like the parameters, updated locally with no communication, resharded by
    DCP on load, and gathered only to sample or evaluate."""

    name = "fsdp2"

    def parallelize(self, module):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for i, block in enumerate(module.blocks):
            # The last block's parameters are needed again at once by backward: keep them.
            fully_shard(
                block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(module.blocks) - 1
            )
        fully_shard(module, mesh=mesh, mp_policy=mp)
        return module

    def sync_gradients(self, last_micro_batch):
        # Gradient accumulation without a reduce-scatter per micro-batch.
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

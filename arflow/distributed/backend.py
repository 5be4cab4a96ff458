"""The small interface every data-parallel backend implements, and what they share.

The trainer builds a plain model, hands it to `build_backend` (parallelize.py), and from then
on only talks to the backend: one optimizer step over a list of micro-batches, the fp32 tensors
the EMA tracks, gathering sharded tensors for sampling, and saving / loading its own state.
Parallelism is applied from outside the model (torchtitan's "parallelize" step): the model code
never learns which backend runs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from arflow.config import Config
from arflow.distributed.env import DistInfo
from arflow.storage import FileRecorder

# loss_fn(model, x (B, S, C, H, W), y (B,)) -> scalar loss
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# Asked when the step decides: was this rank asked to stop (a preemption notice)?
StopPoll = Callable[[], bool]
# write(recorder, group): a checkpoint's backend files, written (see Backend.stage_state).
StateWriter = Callable[[FileRecorder, object], None]
# stage(state, key): a copy of `state` in host memory (arflow.distributed.staging.HostStager).
Stage = Callable[[object, str], object]


@dataclass
class StepResult:
    """One optimizer step. The numbers stay on the device (the trainer sums them there and reads
    them at log steps); the two decisions are the same on every rank."""

    loss: torch.Tensor  # () fp32: this rank's mean loss over its micro-batches
    grad_norm: torch.Tensor  # () fp32: global gradient norm before clipping (nan: not computed)
    skipped: bool  # non-finite loss or gradient on some rank: no parameter or optimizer change
    stop: bool = False  # some rank was asked to stop (preemption notice)


def step_decision(nonfinite: torch.Tensor, stop: StopPoll | None) -> tuple[bool, bool]:
    """(skip, stop) as every rank sees them: skip the update when `nonfinite` (a () bool tensor)
    is true on any rank, stop when any rank was asked to (`stop()`, polled now). One small
    all-reduce, read on the host: the step's only host sync."""
    asked = stop is not None and stop()
    flags = torch.stack([nonfinite, torch.full_like(nonfinite, asked)]).float()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    skip, stop = flags.tolist()
    return skip > 0, stop > 0


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """The precision to train in: "bf16", "tf32" or "fp32" ("auto": bf16 on CUDA, fp32 on CPU)."""
    precision = cfg.parallel.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision


def set_matmul_precision(precision: str) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores under "tf32" (the public release's
    training) and "bf16" (the parts of a bf16 step left in fp32), exact under "fp32". Process-wide
    PyTorch flags; they do nothing on CPU."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices / conv kernels only, none on 1-D tensors (biases, norm
    gains). Frozen parameters (the fixed positional table) are left out."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(params: Iterable | list[dict], cfg: Config, cls=torch.optim.AdamW):
    o = cfg.optim
    # foreach keeps the update order deterministic and fast on CPU and GPU alike.
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class Backend(ABC):
    """One data-parallel strategy. `module` is the user's model as the backend holds it
    (possibly sharded); `model` is what forward is called on."""

    name: str

    def __init__(
        self, module: nn.Module, cfg: Config, info: DistInfo, reshard_resume: bool = False
    ):
        """`module`: the plain model on CPU, fp32, freshly initialised, its blocks already
        prepared (activation checkpointing, compile); `reshard_resume`: the run will load a
        checkpoint written with another world size or layout (DeepSpeed must know before it
        builds its optimizer; the others reshard while loading)."""
        self.cfg = cfg
        self.info = info
        self.precision = resolve_precision(cfg, info.device)
        # Compute dtype: bf16 activations (fp32 master weights), or fp32 for "tf32" and "fp32".
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        set_matmul_precision(self.precision)

    # -------------------------------------------------------------------------- training
    @abstractmethod
    def train_step(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: LossFn,
        lr: float,
        stop: StopPoll | None = None,
    ) -> StepResult:
        """Forward/backward over the micro-batches, then one optimizer step at `lr` unless a
        loss or the gradient is non-finite on any rank. `stop` is polled when the step decides
        and agreed with the other ranks in the same exchange as the non-finite check
        (`step_decision`), so a step costs one host sync."""

    # ------------------------------------------------------------------------------- EMA
    @abstractmethod
    def master_params(self) -> dict[str, torch.Tensor]:
        """Name -> this rank's fp32 master copy of each trainable parameter (a shard where the
        backend shards them). The EMA mirrors exactly these tensors."""

    @abstractmethod
    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors, on every rank, from local ones laid out like `master_params()`."""

    @abstractmethod
    def shard_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `gather_full`: this rank's part, laid out like `master_params()`, of
        full tensors (the same on every rank); no communication."""

    # ------------------------------------------------------------------------ checkpoints
    # The checkpoint component (arflow.checkpoint) owns directories, integrity and the EMA; a
    # backend only writes and reads its own model and optimizer state.
    @abstractmethod
    def stage_state(self, path: str, stage: Stage | None) -> StateWriter:
        """Take model and optimizer state for a checkpoint under the local directory `path`
        (every rank, collectively): copied by `stage(state, key)` into host memory (the
        training step may change the originals as soon as this returns), or the live tensors
        when `stage` is None. Returns the function that writes it there — `write(recorder,
        group)`, through `recorder` where the library lets us (sizes and checksums while
        writing), collectives on `group` — callable from a background thread."""

    @abstractmethod
    def load_state(self, path: str, reshard: bool, shared: bool) -> None:
        """Restore what `save_state` wrote into the live model and optimizer. `reshard`: written
        with another world size or layout; `shared`: every rank sees the same `path` (False
        when each rank downloaded its own copy of a remote checkpoint). Files are verified
        against the checkpoint's checksums before this is called; pickled files are still
        refused when they need code to unpickle (arflow.utils.safe_load)."""

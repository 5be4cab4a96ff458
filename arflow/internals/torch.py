"""torch core internals ARFlow relies on, checked when this module is imported.

- The weights-only unpickler's wording when it refuses code (a global outside the allowlist, a
  call, an object construction) and when a byte is not a pickle opcode: it tells a checkpoint
  file that would run code from a damaged one (arflow.utils.safe_load). Each wording is probed
  with a pickle that triggers it.
- `_MultiProcessingDataLoaderIter._shutdown_workers`: stopping a DataLoader's worker processes
  now rather than at garbage collection (arflow.data.loader).
- `torch.cuda.memory._record_memory_history` / `_dump_snapshot`: the CUDA allocator's history
  over the `train.profile` window (arflow.utils.profiling); no public form exists yet.

The lower bound is the oldest torch with every public API ARFlow calls: FSDP2's `fully_shard`
and `MixedPrecisionPolicy` in torch.distributed.fsdp, `nn.utils.get_total_norm` and
`clip_grads_with_norm_`, `distribute_tensor(src_data_rank=...)` (all 2.6). The upper bound is
the newest torch the internals here and in arflow.internals.dcp were tested with.
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch.utils.data import dataloader

from arflow.internals import Supported

SUPPORTED = Supported("torch", "2.6.0", "2.14.1")

# The words of each kind of refusal, with a pickle that provokes it (none of them resolves
# anything outside torch: the unpickler refuses before it would).
_REFUSAL_PROBES = {
    "GLOBAL ": b"\x80\x02carflow_probe\nnot_allowed\n.",  # a global outside the allowlist
    "Trying to call reduce": b"\x80\x02ctorch\nSize\n)R)R.",  # calling what is not allowed
    "Can only create new object": b"\x80\x02ctorch\nSize\n)R)\x81.",  # NEWOBJ of it
    "Can only build": b"\x80\x02ctorch\nSize\n}b.",  # BUILD on a type that is not allowed
}
WEIGHTS_ONLY_REFUSALS = tuple(_REFUSAL_PROBES)
_DAMAGE, _DAMAGE_PROBE = "Unsupported operand", b"\x80\x02\xfe."  # a byte that is no opcode


def weights_only_refusal(err: BaseException) -> str | None:
    """The line of a weights-only `torch.load` error saying it refused code, without torch's
    advice on how to load it anyway; None when the error is something else (a damaged file)."""
    if isinstance(err, pickle.UnpicklingError):
        for line in str(err).splitlines():
            if any(words in line for words in WEIGHTS_ONLY_REFUSALS):
                return line.split(". Please use", 1)[0].strip()
    return None


def weights_only_damage(err: BaseException) -> str:
    """The line of a weights-only `torch.load` error that says what is wrong with a damaged
    pickle (its first byte that is no opcode), else the error's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    return next((line for line in lines if _DAMAGE in line), lines[-1])


def shutdown_workers(iterator: object) -> None:
    """Stop the worker processes of a DataLoader iterator now (a single-process iterator has
    none: nothing to do)."""
    if isinstance(iterator, dataloader._MultiProcessingDataLoaderIter):
        iterator._shutdown_workers()


def start_memory_history(max_entries: int) -> None:
    """Record every CUDA allocation and free from now on, with its stack trace (the newest
    `max_entries` events are kept)."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


def dump_memory_history(path: str | os.PathLike) -> None:
    """Write the recorded history (a pickle for https://pytorch.org/memory_viz) to `path` and
    stop recording."""
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def _load_error(probe: bytes) -> pickle.UnpicklingError | None:
    try:
        torch.load(io.BytesIO(probe), weights_only=True)
    except pickle.UnpicklingError as err:
        return err
    return None


def check(installed: str = torch.__version__) -> None:
    """`installed` in SUPPORTED, and every internal above there and behaving as expected."""
    SUPPORTED.check(installed)
    for words, probe in _REFUSAL_PROBES.items():
        err = _load_error(probe)
        SUPPORTED.require(
            installed,
            err is not None and words in (weights_only_refusal(err) or ""),
            f"the weights-only unpickler's refusal wording {words!r}",
        )
    err = _load_error(_DAMAGE_PROBE)
    SUPPORTED.require(
        installed,
        err is not None and weights_only_refusal(err) is None and _DAMAGE in str(err),
        f"the weights-only unpickler's wording for a damaged pickle {_DAMAGE!r}",
    )
    SUPPORTED.require_parameters(
        installed,
        getattr(torch.cuda.memory, "_record_memory_history", None),
        ["enabled", "context", "stacks", "max_entries"],
        "torch.cuda.memory._record_memory_history",
    )
    SUPPORTED.require_parameters(
        installed,
        getattr(torch.cuda.memory, "_dump_snapshot", None),
        ["filename"],
        "torch.cuda.memory._dump_snapshot",
    )
    iterator = getattr(dataloader, "_MultiProcessingDataLoaderIter", None)
    SUPPORTED.require_parameters(
        installed,
        getattr(iterator, "_shutdown_workers", None),
        ["self"],
        "torch.utils.data.dataloader._MultiProcessingDataLoaderIter._shutdown_workers",
    )


check()

"""Reading checkpoint files without executing code from them.

Pickle-based files can run arbitrary code when loaded; checkpoints on a shared bucket are an
attack surface. Our own files are read with `torch.load(weights_only=True)`. The libraries'
files are gated the same way before the library opens them:

- DeepSpeed loads its ZeRO files with `weights_only=False`; `check_torch_file` first unpickles
  each one with torch's weights-only unpickler (memory-mapped, so tensors are not read) allowing
  only the three plain DeepSpeed classes its files hold. Anything else is refused, never run.
- torch DCP unpickles `.metadata` with plain `pickle` and its non-tensor items with
  `weights_only=False`; arflow.distributed.dcp_io reads them through an allowlist instead.
"""

from __future__ import annotations

import pickle
import zipfile

import torch

from arflow.internals.torch import weights_only_damage, weights_only_refusal


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs code outside the allowlist to unpickle: refused, not run."""


class CorruptFileError(RuntimeError):
    """A checkpoint file cannot be read (truncated, overwritten, not the expected format)."""


def load_torch_file(path: str, allowed: list | tuple = (), mmap: bool = False):
    """`torch.load(path, weights_only=True)` with `allowed` extra classes. Errors name the
    file and tell a file that needs code to unpickle (UnsafeCheckpointError: refused, never
    run) from a damaged one (CorruptFileError)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refusal = weights_only_refusal(err)
        if refusal is not None:
            raise UnsafeCheckpointError(
                f"refusing {path}: it needs arbitrary code to unpickle ({refusal}),"
                f" which is never executed here; only tensors and plain types are allowed"
            ) from None
        raise CorruptFileError(
            f"{path} is corrupt (not a readable torch file: {weights_only_damage(err)})"
        ) from None
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, OSError) as err:
        detail = str(err).split(". ", 1)[0]
        raise CorruptFileError(f"{path} is corrupt or unreadable: {detail}") from None


def check_torch_file(path: str) -> None:
    """Refuse a DeepSpeed file that needs anything but tensors, plain types and DeepSpeed's own
    three plain classes to unpickle (DeepSpeed then loads it with weights_only=False)."""
    from arflow.internals.deepspeed import PICKLE_CLASSES  # imports DeepSpeed: only when used

    load_torch_file(path, PICKLE_CLASSES, mmap=True)

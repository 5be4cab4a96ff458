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


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs code outside the allowlist to unpickle: refused, not run."""


class CorruptFileError(RuntimeError):
    """A checkpoint file cannot be read (truncated, overwritten, not the expected format)."""


def deepspeed_classes() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# How torch's weights-only unpickler words a refusal of code (as opposed to a damaged file,
# which it reports as an unsupported operand, a short string or a zip error).
_REFUSALS = ("GLOBAL ", "Trying to call reduce", "Can only create new object", "Can only build")


def is_unsafe_global_error(err: BaseException) -> bool:
    """torch's weights-only unpickler refused something that would run code."""
    return isinstance(err, pickle.UnpicklingError) and any(r in str(err) for r in _REFUSALS)


def _refusal(err: BaseException) -> str:
    for line in str(err).splitlines():
        if any(r in line for r in _REFUSALS):
            return line.split(". Please use", 1)[0].strip()
    return "a global"


def load_torch_file(path: str, allowed: list | tuple = (), mmap: bool = False):
    """`torch.load(path, weights_only=True)` with `allowed` extra classes. Errors name the
    file and tell a file that needs code to unpickle (UnsafeCheckpointError: refused, never
    run) from a damaged one (CorruptFileError)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if is_unsafe_global_error(err):
            raise UnsafeCheckpointError(
                f"refusing {path}: it needs arbitrary code to unpickle ({_refusal(err)}),"
                f" which is never executed here; only tensors and plain types are allowed"
            ) from None
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported operand" in line), lines[-1])
        raise CorruptFileError(f"{path} is corrupt (not a readable torch file: {detail})") from None
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, OSError) as err:
        detail = str(err).split(". ", 1)[0]
        raise CorruptFileError(f"{path} is corrupt or unreadable: {detail}") from None


def check_torch_file(path: str) -> None:
    """Refuse a DeepSpeed file that needs anything but tensors, plain types and DeepSpeed's own
    three plain classes to unpickle (DeepSpeed then loads it with weights_only=False)."""
    load_torch_file(path, deepspeed_classes(), mmap=True)

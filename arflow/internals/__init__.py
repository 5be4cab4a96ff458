"""Adapters over the libraries' internals: the only modules that touch private attributes,
private functions, file layouts or message texts of torch and DeepSpeed.

    arflow.internals.torch      torch core: the weights-only unpickler's refusals, the fused
                                silu backward, DataLoader worker shutdown
    arflow.internals.dcp        torch.distributed.checkpoint: file-system hooks, metadata read
    arflow.internals.deepspeed  DeepSpeed: ZeRO fragments and partitions, gradient norm,
                                checkpoint-engine hook, universal checkpoints, shm buffer name

Each declares the versions it is tested with (`SUPPORTED`, the same bounds as pyproject.toml)
and checks, when imported, that the installed version is in range and that every internal it
uses is there with the shape it expects; DeepSpeed's per-engine internals are checked when the
backend is built (`check_engine`). Outside the range, or with an internal missing, the error is
an `UnsupportedLibraryError` naming the library, its version, the supported range and what is
missing, before any training step. The DeepSpeed adapter imports DeepSpeed: only code that runs
DeepSpeed imports it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass


class UnsupportedLibraryError(RuntimeError):
    """An installed library is outside the versions ARFlow supports, or lacks an internal
    ARFlow relies on."""


def release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as "2.14.0+cu130" or "0.19.8"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


@dataclass(frozen=True)
class Supported:
    """The versions of one library (its name on PyPI) that an adapter is tested with, both
    bounds included."""

    library: str
    minimum: str
    maximum: str

    @property
    def requirement(self) -> str:
        """The pip requirement these bounds make (as in pyproject.toml)."""
        if self.minimum == self.maximum:
            return f"{self.library}=={self.minimum}"
        return f"{self.library}>={self.minimum},<={self.maximum}"

    def check(self, installed: str) -> None:
        if not release(self.minimum) <= release(installed) <= release(self.maximum):
            raise UnsupportedLibraryError(
                f"{self.library} {installed} is installed, but ARFlow supports {self.library} "
                f"{self.minimum} to {self.maximum} (it uses internals that change between "
                f"versions): install one in that range, e.g. pip install '{self.requirement}'"
            )

    def missing(self, installed: str, what: str) -> UnsupportedLibraryError:
        """The error for an internal that is not there (or not in the expected shape)."""
        return UnsupportedLibraryError(
            f"{self.library} {installed} lacks {what}, which ARFlow relies on (supported: "
            f"{self.library} {self.minimum} to {self.maximum}; pip install '{self.requirement}')"
        )

    def require(self, installed: str, ok: bool, what: str) -> None:
        if not ok:
            raise self.missing(installed, what)

    def require_attribute(self, installed: str, owner: object, name: str, what: str) -> None:
        self.require(installed, hasattr(owner, name), f"{what} (`{name}`)")

    def require_parameters(
        self, installed: str, function: object, names: Sequence[str], what: str
    ) -> None:
        """`function` takes `names` as its first parameters (`self` included for methods)."""
        try:
            found = list(inspect.signature(function).parameters)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            found = []
        self.require(
            installed,
            found[: len(names)] == list(names),
            f"{what} taking ({', '.join(names)}); found ({', '.join(found)})",
        )

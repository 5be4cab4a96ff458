"""Small collectives for decisions that one rank makes for all (rank 0 reads or writes shared
storage, every rank learns the outcome) and for errors that must reach every rank, so that no
rank is left waiting in a collective its peers will never enter. Each takes an optional
process group (the checkpoint writer uses its own, off the training path)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from arflow.distributed.env import DistInfo

T = TypeVar("T")


def main_then_share(info: DistInfo | None, fn: Callable[[], T], group=None) -> T:
    """Run `fn` on rank 0 and hand its result, or its error, to every rank (so a failure on
    rank 0 is raised everywhere instead of leaving the others waiting in a collective)."""
    if info is None or info.world_size == 1:
        return fn()
    box = [None, None]
    if info.is_main:
        try:
            box[0] = fn()
        except Exception as err:  # re-raised below, on every rank
            try:
                pickle.dumps(err)
                box[1] = err
            except Exception:  # an error object that cannot travel: its message can
                box[1] = RuntimeError(f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=_global_rank(0, group), group=group)
    if box[1] is not None:
        raise box[1]
    return box[0]


def all_gather(info: DistInfo | None, obj: T, group=None) -> list[T]:
    """`obj` of every rank, in rank order."""
    if info is None or info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_errors(info: DistInfo | None, error: str | None, group=None) -> list[str]:
    """Every rank's error message; [] when no rank failed."""
    if info is None or info.world_size == 1:
        return [error] if error else []
    return [f"rank {r}: {e}" for r, e in enumerate(all_gather(info, error, group)) if e]


def _global_rank(group_rank: int, group) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)

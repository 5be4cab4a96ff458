"""Capture and restore every random generator a training step reads (per rank).

The noise levels and noise of the flow loss and the class-label dropout all draw from torch's
global generators; python's and numpy's are saved too for anything else that uses them.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_rank(seed: int, rank: int) -> None:
    """Distinct, reproducible streams per rank (model init happens before, from `seed` alone)."""
    s = seed * 100_003 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (a checkpoint holding it loads with
    torch.load(weights_only=True): nothing in it needs code to unpickle)."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (checkpointing, sampling, logging) outside the training random stream:
    whatever it draws, the stream continues as if it had not run, so a resumed run (which does
    not repeat the block) draws exactly what the uninterrupted one did. Runs once per
    micro-batch: the generators' own state objects are kept as they are (no conversion)."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

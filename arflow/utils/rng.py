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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (checkpointing, sampling, logging) outside the training random stream:
    whatever it draws, the stream continues as if it had not run, so a resumed run (which does
    not repeat the block) draws exactly what the uninterrupted one did."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)

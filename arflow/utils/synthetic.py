"""Random sequences with the SequenceLoader interface, for benchmarks and smoke tests that
must not depend on a dataset (e.g. XL/2 throughput on a GPU machine without ImageNet)."""

from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(
        self,
        *,
        sample_shape,
        num_classes: int,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        seed: int = 0,
    ):
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.index = 0  # batches handed out so far

    bad_samples = 0  # the SequenceLoader interface: nothing is read, nothing can be bad

    def close(self) -> None:
        """Nothing to stop (no worker processes)."""

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def __iter__(self):
        while True:
            # Each batch is a function of (seed, rank, index) alone: resuming is exact.
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.index)) % 2**63)
            x = torch.randn(
                (self.batch_size, self.seq_len, *self.sample_shape), generator=g
            ).clamp_(-1, 1)
            y = torch.randint(self.num_classes, (self.batch_size,), generator=g)
            self.index += 1
            yield x, y

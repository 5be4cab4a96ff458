"""One data stream: reads its shards as the plan says and turns groups into image sequences.

Runs inside a DataLoader worker (or the main process with num_workers=0) and yields micro-batches::

    x    float32 (b, n, C, H, W)   pixels in [-1, 1], or latents (mean + exp(logvar / 2) * eps) * scale
    y    int64   (b,)              class id of each sequence
    tag  (epoch, round, offset, bad_samples): the stream's position after the micro-batch's last group
    meta {"sample_ids": int64 (b, n), "epoch": int64 (b,)}   only with return_meta

b = the stream's share of the batch (Layout.micro_batch). Flips and latent noise are seeded by
(seed, epoch, shard, group), so a sequence is the same whichever stream emits it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from arflow.data.errors import BadSampleWarning, ShardError
from arflow.data.manifest import Manifest
from arflow.data.plan import NOISE, Groups, PlanView, Position
from arflow.data.shards import iter_shard
from arflow.data.storage import RetryPolicy


@dataclass(frozen=True)
class ReadOptions:
    storage_options: dict | None
    retry: RetryPolicy
    verify_checksums: bool
    max_bad_samples: int
    return_meta: bool


class OpenShard:
    """A shard being read front to back, holding the current window's samples in memory."""

    def __init__(
        self, manifest: Manifest, shard: int, groups: Groups, options: ReadOptions, on_bad
    ):
        info = manifest.shards[shard]
        self.groups = groups
        self._samples = iter_shard(
            info,
            dtype=manifest.stored_dtype,
            shape=manifest.stored_shape,
            on_bad=on_bad,
            storage_options=options.storage_options,
            retry=options.retry,
            verify=options.verify_checksums,
        )
        self._buffer: dict[int, np.ndarray | None] = {}
        self._read = 0
        self._lo = 0

    def fetch(self, group: int) -> list[np.ndarray | None]:
        """The stored arrays of the group's members (None for a bad sample); reads up to its window's end."""
        lo, hi = (int(v) for v in self.groups.windows[group])
        if lo != self._lo:  # a new window: the previous one is no longer needed
            self._buffer = {i: a for i, a in self._buffer.items() if i >= lo}
            self._lo = lo
        while self._read < hi:
            index, array = next(self._samples)
            if index >= lo:
                self._buffer[index] = array
            self._read += 1
        return [self._buffer[int(i)] for i in self.groups.members[group]]

    def finish(self) -> None:
        """Read the rest of the shard, which verifies its checksum."""
        for _ in self._samples:
            pass

    def close(self) -> None:
        self._samples.close()


class SequenceStream(IterableDataset):
    """The streams of one rank; DataLoader worker w runs stream rank * V + w from ``positions[w]``."""

    def __init__(
        self,
        manifest: Manifest,
        view: PlanView,
        rank: int,
        positions: list[Position],
        bad_samples: list[int],
        options: ReadOptions,
    ):
        self.manifest, self.view, self.rank = manifest, view, rank
        self.positions, self.bad_samples, self.options = positions, bad_samples, options
        self._offsets = np.cumsum([0] + [s.count for s in manifest.shards])

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.rank * self.view.layout.streams_per_rank + worker
        bad = self.bad_samples[worker]

        def on_bad(message: str, count: int) -> None:
            nonlocal bad
            bad += count
            warnings.warn(
                BadSampleWarning(f"{message} [{bad} bad samples on this stream]"), stacklevel=2
            )
            if bad > self.options.max_bad_samples:
                raise ShardError(
                    f"{bad} bad samples on data stream {stream} exceed max_bad_samples="
                    f"{self.options.max_bad_samples}; last: {message}"
                )

        size = self.view.layout.micro_batch(stream)
        n, shape = self.view.planner.config.seq_len, tuple(self.manifest.sample_shape)
        x = np.empty((size, n, *shape), np.float32)
        ys, ids, epochs = [], [], []
        for (epoch, r, j), shard, group, groups, arrays in self._groups(
            stream, self.positions[worker], on_bad
        ):
            if any(a is None for a in arrays):
                continue  # a bad member: the sequence is dropped (the sample was reported when read)
            self._images(arrays, groups.flips[group], epoch, shard, group, out=x[len(ys)])
            ys.append(self.manifest.shards[shard].class_id)
            ids.append(self._offsets[shard] + groups.members[group])
            epochs.append(epoch)
            if len(ys) == size:
                item = (
                    torch.from_numpy(x),
                    torch.tensor(ys, dtype=torch.int64),
                    (epoch, r, j, bad),
                )
                if self.options.return_meta:
                    item += (
                        {
                            "sample_ids": torch.from_numpy(np.stack(ids)),
                            "epoch": torch.tensor(epochs, dtype=torch.int64),
                        },
                    )
                yield item
                x = np.empty_like(x)
                ys, ids, epochs = [], [], []

    def _groups(self, stream: int, position: Position, on_bad):
        """Yield (position after, shard, group index, shard's Groups, member arrays) forever."""
        epoch, first_round, offset = position
        while True:
            rounds = self.view.rounds(epoch)[stream]
            for r in range(first_round, len(rounds)):
                slots, order = rounds[r].slots, rounds[r].order
                next_group = [
                    s.start + int(c)
                    for s, c in zip(slots, np.bincount(order[:offset], minlength=len(slots)))
                ]
                opened: dict[int, OpenShard] = {}
                try:
                    for j in range(offset, len(order)):
                        k = int(order[j])
                        shard, group = slots[k].shard, next_group[k]
                        reader = opened.get(k)
                        if reader is None:
                            groups = self.view.planner.groups(shard, epoch)
                            reader = opened[k] = OpenShard(
                                self.manifest, shard, groups, self.options, on_bad
                            )
                        arrays = reader.fetch(group)
                        next_group[k] += 1
                        if next_group[k] == slots[k].stop:
                            opened.pop(k).finish()
                        yield (epoch, r, j + 1), shard, group, reader.groups, arrays
                finally:
                    for shard_reader in opened.values():
                        shard_reader.close()
                offset = 0
            first_round = 0
            epoch += 1

    def _images(
        self,
        arrays: list[np.ndarray],
        flips: np.ndarray,
        epoch: int,
        shard: int,
        group: int,
        out: np.ndarray,
    ) -> None:
        """n stored arrays and their flip bits (n,) -> ``out`` (n, C, H, W) float32, written in place."""
        if self.manifest.encoding == "pixels":
            for k, (array, flip) in enumerate(zip(arrays, flips)):
                np.divide(array[..., ::-1] if flip else array, np.float32(127.5), out=out[k])
            out -= 1
            return
        # latents: (mean + exp(logvar / 2) * eps) * scale, with the flipped image's moments when flipped
        channels = out.shape[1]
        rng = np.random.default_rng([self.view.planner.config.seed, NOISE, epoch, shard, group])
        rng.standard_normal(dtype=np.float32, out=out)
        for k, (array, flip) in enumerate(zip(arrays, flips)):
            moments = array[int(flip)].astype(np.float32, copy=False)  # (2C, H, W): [mean; logvar]
            out[k] *= np.exp(moments[channels:] / 2)
            out[k] += moments[:channels]
        out *= np.float32(self.manifest.scaling_factor)

"""One data stream: reads its shards as the plan says and turns groups into image sequences.

Runs inside a DataLoader worker (or the main process with num_workers=0). Micro-batch m, the
stream's share of batch m, is written into its slot (see :class:`Slots`)::

    x    float32 (b, n, C, H, W)   pixels in [-1, 1], or latents (mean + exp(logvar / 2) * eps) * scale

and the stream yields the small parts, numpy arrays and plain values pickled inline::

    index m
    y    int64   (b,)              class id of each sequence
    tag  (epoch, round, offset, bad_samples): the stream's position after the micro-batch's last group
    meta {"sample_ids": int64 (b, n), "epoch": int64 (b,)}   (None without return_meta)

b = the stream's share of the batch (Layout.micro_batch). Flips and latent noise are functions of
(seed, epoch, shard, group), so a sequence is the same whichever stream emits it."""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from arflow.data.errors import BadSampleWarning, ShardError
from arflow.data.manifest import Manifest
from arflow.data.plan import NOISE, Groups, PlanView, Position
from arflow.data.shards import iter_shard, open_shard
from arflow.storage import RetryPolicy


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
        self._reader = open_shard(info, options.storage_options, options.retry)
        self._samples = iter_shard(
            info,
            dtype=manifest.stored_dtype,
            shape=manifest.stored_shape,
            on_bad=on_bad,
            verify=options.verify_checksums,
            reader=self._reader,
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
        self._reader.close()  # also when no sample was read: the generator never started


class Slots:
    """Buffers the streams write their micro-batches into, shared with the DataLoader workers.

    Returning each micro-batch as a tensor of its own would cost, per micro-batch, a new
    shared-memory segment, its page faults, and an authenticated socket hand-over of its file
    descriptor (~1 ms together: more than decoding 80 digits). Instead the loader allocates,
    once per iterator and before the workers start, ``depth`` slots per stream; stream w writes
    its micro-batch m into slot m % depth and returns only the small parts, and the loader copies
    batch m out of the slots before it asks for anything more. DataLoader asks a worker for its
    micro-batch m only after it has handed out the worker's micro-batch m - prefetch_factor, so
    with depth = prefetch_factor + 1 a slot is never rewritten before it was copied;
    ``assembled`` (batches copied so far, shared) lets a worker check that and fail loudly.

    buffers: float32 (streams of this rank, depth, micro-batch, n, C, H, W).
    """

    def __init__(self, streams: int, depth: int, rows: int, shape: tuple[int, ...], shared: bool):
        self.depth = depth
        self.buffers = torch.empty((streams, depth, rows, *shape))
        self.assembled = torch.zeros(1, dtype=torch.int64)
        if shared:
            self.buffers.share_memory_()
            self.assembled.share_memory_()

    def for_writing(self, worker: int, index: int) -> np.ndarray:
        """The slot of the worker's micro-batch ``index``, (rows, n, C, H, W)."""
        if index - self.depth >= int(self.assembled[0]):
            raise RuntimeError(
                f"data worker {worker} was asked for micro-batch {index} while batch "
                f"{index - self.depth} still occupies its slot (the DataLoader prefetches more "
                f"than the {self.depth} slots allow)"
            )
        return self.buffers[worker, index % self.depth].numpy()

    def batch(self, index: int, rows: list[int], out: torch.Tensor) -> torch.Tensor:
        """Copy batch ``index`` (the first rows[w] rows of every worker's slot) into ``out``."""
        parts = [self.buffers[w, index % self.depth, :r].numpy() for w, r in enumerate(rows)]
        np.concatenate(parts, out=out.numpy())
        self.assembled[0] = index + 1
        return out


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
        slots: Slots,
    ):
        self.manifest, self.view, self.rank = manifest, view, rank
        self.positions, self.bad_samples, self.options = positions, bad_samples, options
        self.slots = slots
        self._offsets = np.concatenate([[0], np.cumsum(manifest.shards.counts)])

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
        noise = torch.Generator()  # re-seeded per sequence, see _images
        index = 0  # of the micro-batch being filled
        x = self.slots.for_writing(worker, index)
        ys, ids, epochs = [], [], []
        for (epoch, r, j), shard, group, groups, arrays in self._groups(
            stream, self.positions[worker], on_bad
        ):
            if any(a is None for a in arrays):
                continue  # a bad member: the sequence is dropped (the sample was reported when read)
            self._images(arrays, groups.flips[group], (epoch, shard, group), noise, x[len(ys)])
            ys.append(self.manifest.shards.class_ids[shard])
            ids.append(self._offsets[shard] + groups.members[group])
            epochs.append(epoch)
            if len(ys) == size:
                meta = None
                if self.options.return_meta:
                    meta = {"sample_ids": np.stack(ids), "epoch": np.array(epochs, np.int64)}
                yield index, np.array(ys, np.int64), (epoch, r, j, bad), meta
                index += 1
                x = self.slots.for_writing(worker, index)
                ys, ids, epochs = [], [], []

    def _groups(self, stream: int, position: Position, on_bad):
        """Yield (position after, shard, group index, shard's Groups, member arrays) forever.

        All shards of a round are opened together, and the next round's when a quarter of the
        current one is left, so that on an object store their downloads (read ahead) overlap with
        the groups still to emit instead of stalling the stream at every round and epoch start."""
        rounds = self._rounds(stream, position)
        current = self._open_round(*next(rounds), on_bad)
        upcoming = None
        try:
            while True:
                epoch, r, rnd, offset, next_group, opened = current
                slots, order = rnd.slots, rnd.order
                ahead_at = len(order) - max(1, (len(order) - offset) // 4)
                for j in range(offset, len(order)):
                    if j == ahead_at:
                        upcoming = self._open_round(*next(rounds), on_bad)
                    k = int(order[j])
                    shard, group = slots[k].shard, next_group[k]
                    reader = opened[k]
                    arrays = reader.fetch(group)
                    next_group[k] += 1
                    if next_group[k] == slots[k].stop:
                        opened.pop(k).finish()
                    yield (epoch, r, j + 1), shard, group, reader.groups, arrays
                current, upcoming = upcoming or self._open_round(*next(rounds), on_bad), None
        finally:
            for state in (current, upcoming):
                for shard_reader in (state[-1] if state else {}).values():
                    shard_reader.close()

    def _rounds(self, stream: int, position: Position):
        """(epoch, round index, Round, groups of it already processed) from ``position`` on."""
        epoch, first_round, offset = position
        while True:
            rounds = self.view.rounds(epoch, stream)
            for r in range(first_round, len(rounds)):
                yield epoch, r, rounds[r], offset
                offset = 0
            first_round = 0
            epoch += 1

    def _open_round(self, epoch: int, r: int, rnd, offset: int, on_bad):
        """The round with its next group per slot and its unfinished shards opened."""
        next_group = [
            s.start + int(c)
            for s, c in zip(rnd.slots, np.bincount(rnd.order[:offset], minlength=len(rnd.slots)))
        ]
        opened: dict[int, OpenShard] = {}
        try:
            for k, s in enumerate(rnd.slots):
                if next_group[k] < s.stop:
                    groups = self.view.planner.groups(s.shard, epoch)
                    opened[k] = OpenShard(self.manifest, s.shard, groups, self.options, on_bad)
        except BaseException:
            for shard_reader in opened.values():
                shard_reader.close()
            raise
        return epoch, r, rnd, offset, next_group, opened

    def _images(
        self,
        arrays: list[np.ndarray],
        flips: np.ndarray,
        key: tuple[int, int, int],
        noise: torch.Generator,
        out: np.ndarray,
    ) -> None:
        """n stored arrays and their flip bits (n,) -> ``out`` (n, C, H, W) float32, in place.

        key: (epoch, shard, group), which seeds the sequence's latent noise.
        """
        if self.manifest.encoding == "pixels":
            for k, (array, flip) in enumerate(zip(arrays, flips)):
                np.divide(array[..., ::-1] if flip else array, np.float32(127.5), out=out[k])
            out -= 1
            return
        # latents: (mean + exp(logvar / 2) * eps) * scale, the flipped image's moments when flipped.
        # torch's normal sampler is ~3x numpy's; the whole sequence's noise in one call.
        noise.manual_seed(noise_seed(self.view.planner.config.seed, *key))
        torch.randn(out.shape, generator=noise, out=torch.from_numpy(out))
        moments = np.stack([a[int(f)] for a, f in zip(arrays, flips)]).astype(
            np.float32, copy=False
        )
        channels = out.shape[1]
        out *= np.exp(moments[:, channels:] * np.float32(0.5))
        out += moments[:, :channels]
        out *= np.float32(self.manifest.scaling_factor)


def noise_seed(seed: int, epoch: int, shard: int, group: int) -> int:
    """The 64-bit seed of one sequence's latent noise (torch.Generator.manual_seed).

    A function of the sequence alone, like its members and flips, so resuming needs no generator
    state and a sequence is the same whichever stream (rank, worker, world size) emits it.
    """
    digest = hashlib.blake2b(struct.pack("<5q", seed, NOISE, epoch, shard, group), digest_size=8)
    return int.from_bytes(digest.digest(), "little")

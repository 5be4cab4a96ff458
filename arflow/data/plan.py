"""Epoch plans: which sequences an epoch holds, which data stream emits them, and in which order.

Vocabulary. A *shard* holds the samples of one class; n = seq_len. A *group* is one future sequence:
n distinct sample indices of one shard and a flip bit per image. A *stream* is one producer of
sequences, a (rank, DataLoader worker) pair with id ``rank * V + worker``, V = max(num_workers, 1).

What an epoch holds depends only on (manifest, seq_len, class_sampling, window, seed, epoch), never
on the world size or worker count. Shard i yields g_i groups per epoch:

- ``proportional``: g_i = floor(m_i / n); every sample of the shard is in exactly one sequence per
  epoch, except m_i mod n samples left out at random from the shard's last window.
- ``uniform``: every class yields the same number Q = max(1, floor(N / (C n))) of sequences per
  epoch (N samples in C classes, so an epoch still covers about N images), split across the class's
  shards in proportion to their size. A class with more than Q n samples uses a fresh random subset
  each epoch; a smaller one reuses samples across sequences (never inside one).

Groups are drawn inside *windows* of about ``window`` consecutive samples (a multiple of n; the
window boundaries shift randomly each epoch), so a reader holds at most one window per open shard
in memory. make_shards shuffles each class before sharding, so a window is a random subset.

Who emits what depends on the layout. Each epoch the shards are shuffled (seeded by epoch) and dealt
greedily to the least-loaded stream, which balances the streams to within one shard's groups. A
stream reads its shards in *rounds* of ``open_shards`` shards at a time and emits their groups in a
uniformly random interleaving, so consecutive sequences (and a batch) mix up to ``open_shards``
classes per stream.

Cost at scale (S shards, W streams): the content is O(S log S) arrays; the deal, the only step that
spans the world, is O(S log W) and a few array entries per shard (:class:`Deal`); a stream's rounds
are derived from the deal when its worker asks for them (:meth:`PlanView.rounds`), and a shard's
groups when the stream opens the shard. No step builds every stream's plan unless asked to
(re-planning after a layout change locates every old stream).

A *position* (epoch, round, offset) counts the groups a stream has processed; together with the
plan it says exactly which groups are consumed. That makes two kinds of restart possible:
same layout -> continue each stream at its position; new layout -> re-plan only what is left of the
epochs in flight (``starts``: per epoch and shard, how many of its groups are consumed; groups are
always consumed front to back within a shard).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Domain tags keep the random streams of different decisions independent.
_GROUPS, _SHARD_ORDER, _INTERLEAVE, NOISE = 1, 2, 3, 4

Position = tuple[int, int, int]  # (epoch, round, groups processed in that round)
Starts = dict[int, dict[int, int]]  # epoch -> shard -> groups consumed from the front


@dataclass(frozen=True)
class PlanConfig:
    seq_len: int
    class_sampling: str  # "uniform" | "proportional"
    seed: int
    window: int  # samples per window before rounding down to a multiple of seq_len


@dataclass(frozen=True)
class Layout:
    world_size: int
    streams_per_rank: int
    batch_size: int
    open_shards: int

    @property
    def num_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def micro_batch(self, stream: int) -> int:
        """Sequences a stream contributes to each batch of its rank (the batch split over the workers)."""
        worker = stream % self.streams_per_rank
        return self.batch_size // self.streams_per_rank + (
            worker < self.batch_size % self.streams_per_rank
        )


class Groups(NamedTuple):
    members: np.ndarray  # (g, n) int64: sample indices within the shard, distinct within a row
    flips: np.ndarray  # (g, n) bool: horizontal flip per image
    windows: np.ndarray  # (g, 2) int64: [lo, hi) sample range a row is drawn from; non-decreasing


class Slot(NamedTuple):
    shard: int
    start: int  # first group index emitted in this round
    stop: int  # one past the last


class Round(NamedTuple):
    slots: tuple[Slot, ...]
    order: np.ndarray  # (sum of stop - start,) int: which slot emits each successive group


def split(total: int, weights: np.ndarray) -> np.ndarray:
    """``total`` split in proportion to ``weights`` by largest remainders (ties to the lower index)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    parts = np.floor(exact).astype(np.int64)
    parts[np.argsort(-(exact - parts), kind="stable")[: total - parts.sum()]] += 1
    return parts


class Deal(NamedTuple):
    """Which stream each shard with groups left goes to in one epoch, in the order they were dealt.

    The deal is the one whole-world step of planning: O(S log W) for S shards and W streams, a
    few array entries per shard. A stream's rounds are derived from it on demand
    (:meth:`Planner.rounds`), so a worker never builds the other streams' plans.
    """

    shards: np.ndarray  # (k,) int64: shard ids
    streams: np.ndarray  # (k,) int64: the stream each shard was dealt to
    starts: np.ndarray  # (k,) int64: the first group of the shard left in this epoch
    by_stream: np.ndarray  # (k,) int64: argsort of ``streams`` (stable: dealing order per stream)
    bounds: np.ndarray  # (W + 1,) int64: stream s owns by_stream[bounds[s]:bounds[s + 1]]


class Planner:
    """Layout-independent epoch content plus layout-dependent assignment, both deterministic.

    shard_counts, shard_classes: (S,) samples and class id per shard (manifest order);
    usable: (S,) bool, False for shards of dropped classes.
    """

    def __init__(self, shard_counts, shard_classes, usable, config: PlanConfig):
        self.config = config
        self.counts = np.asarray(shard_counts, dtype=np.int64)
        self.classes = np.asarray(shard_classes, dtype=np.int64)
        self.usable = np.asarray(usable, dtype=bool)
        n = config.seq_len
        self.window = max(n, config.window // n * n)
        self.groups_per_shard = np.zeros(len(self.counts), dtype=np.int64)
        if config.class_sampling == "proportional":
            self.groups_per_shard[self.usable] = self.counts[self.usable] // n
        else:
            self.groups_per_shard[self.usable] = _class_quotas(
                self.counts[self.usable], self.classes[self.usable], n
            )

    @property
    def sequences_per_epoch(self) -> int:
        return int(self.groups_per_shard.sum())

    def groups(self, shard: int, epoch: int) -> Groups:
        """The groups of ``shard`` in ``epoch``, in emission order (window by window)."""
        n, m, total = (
            self.config.seq_len,
            int(self.counts[shard]),
            int(self.groups_per_shard[shard]),
        )
        rng = np.random.default_rng([self.config.seed, _GROUPS, epoch, shard])
        phase = n * int(rng.integers(0, self.window // n))
        bounds = [0, *range(phase or self.window, m, self.window), m]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < n:  # too small for a sequence: merge
            del bounds[-2]
        sizes = np.diff(bounds)
        per_window = (
            sizes // n if self.config.class_sampling == "proportional" else split(total, sizes)
        )
        members, windows = [], []
        for lo, size, k in zip(bounds, sizes, per_window):
            if k * n <= size:  # each sample at most once
                rows = rng.permutation(size)[: k * n].reshape(k, n)
            else:  # reuse across rows, distinct within a row
                rows = np.argsort(rng.random((k, size)), axis=1)[:, :n]
            members.append(rows + lo)
            windows.append(np.tile([lo, lo + size], (k, 1)))
        flips = rng.random((total, n)) < 0.5
        return Groups(np.concatenate(members), flips, np.concatenate(windows))

    def deal(self, epoch: int, layout: Layout, starts: dict[int, int]) -> Deal:
        """The shards of ``epoch`` dealt to the streams of ``layout``: shuffled (seeded by epoch),
        each to the stream with the fewest groups so far (ties: the lower stream id); shard i
        contributes groups starts.get(i, 0) .. g_i - 1."""
        first = np.zeros(len(self.counts), dtype=np.int64)
        for shard, start in starts.items():
            first[shard] = start
        order = np.random.default_rng([self.config.seed, _SHARD_ORDER, epoch]).permutation(
            len(self.counts)
        )
        left = (self.groups_per_shard - first)[order]
        order = order[left > 0]
        heap = [(0, s) for s in range(layout.num_streams)]  # sorted, hence a heap
        streams = []
        for size in left[left > 0].tolist():
            load, stream = heap[0]
            streams.append(stream)
            heapq.heapreplace(heap, (load + size, stream))
        streams = np.array(streams, dtype=np.int64)
        by_stream = np.argsort(streams, kind="stable")
        bounds = np.searchsorted(streams[by_stream], np.arange(layout.num_streams + 1))
        return Deal(order, streams, first[order], by_stream, bounds)

    def rounds(self, epoch: int, layout: Layout, deal: Deal, stream: int) -> list[Round]:
        """The rounds of ``stream`` in ``epoch``, given the epoch's ``deal`` for ``layout``."""
        mine = deal.by_stream[deal.bounds[stream] : deal.bounds[stream + 1]]
        slots = [
            Slot(shard, start, stop)
            for shard, start, stop in zip(
                deal.shards[mine].tolist(),
                deal.starts[mine].tolist(),
                self.groups_per_shard[deal.shards[mine]].tolist(),
            )
        ]
        rounds = []
        for r in range(0, len(slots), layout.open_shards):
            chunk = tuple(slots[r : r + layout.open_shards])
            rng = np.random.default_rng(
                [self.config.seed, _INTERLEAVE, epoch, layout.num_streams, stream, r]
            )
            owners = np.repeat(np.arange(len(chunk)), [s.stop - s.start for s in chunk])
            rounds.append(Round(chunk, rng.permutation(owners)))
        return rounds


def _class_quotas(counts: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    """Uniform sampling's groups per shard: every class gets Q = max(1, N // (C n)) groups, split
    over its shards as :func:`split` does (largest remainders, ties to the lower index), for all
    classes at once: O(S log S) rather than one pass over all S shards per class.

    counts, classes: (S,) of the shards to plan (manifest order). Returns (S,) int64.
    """
    kept, dense = np.unique(classes, return_inverse=True)
    quota = max(1, int(counts.sum()) // (len(kept) * n))
    weights = counts.astype(np.float64)
    exact = quota * weights / np.bincount(dense, weights=weights)[dense]
    parts = np.floor(exact).astype(np.int64)
    short = quota - np.bincount(dense, weights=parts).astype(np.int64)
    # per class: shards by descending remainder, ties to the lower index; the first `short` get +1
    order = np.lexsort((np.arange(len(counts)), -(exact - parts), dense))
    first_of_class = np.searchsorted(dense[order], np.arange(len(kept)))
    rank_in_class = np.arange(len(counts)) - first_of_class[dense[order]]
    parts[order[rank_in_class < short[dense[order]]]] += 1
    return parts


class PlanView:
    """The plan of one layout from a base (epoch, starts) on. Each epoch's deal and the rounds of
    the streams asked for are cached (the last five epochs): a DataLoader worker builds only its
    own stream's rounds."""

    def __init__(
        self, planner: Planner, layout: Layout, base_epoch: int = 0, starts: Starts | None = None
    ):
        self.planner, self.layout, self.base_epoch = planner, layout, base_epoch
        self.starts: Starts = starts or {}
        self._cache: dict[int, tuple[Deal, dict[int, list[Round]]]] = {}

    def deal(self, epoch: int) -> Deal:
        return self._epoch(epoch)[0]

    def rounds(self, epoch: int, stream: int) -> list[Round]:
        deal, rounds = self._epoch(epoch)
        if stream not in rounds:
            rounds[stream] = self.planner.rounds(epoch, self.layout, deal, stream)
        return rounds[stream]

    def _epoch(self, epoch: int) -> tuple[Deal, dict[int, list[Round]]]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            deal = self.planner.deal(epoch, self.layout, self.starts.get(epoch, {}))
            self._cache[epoch] = (deal, {})
        return self._cache[epoch]

    def locate(self, stream: int, processed: int) -> Position:
        """Position of ``stream`` after ``processed`` groups from the base."""
        epoch = self.base_epoch
        while True:
            for r, rnd in enumerate(self.rounds(epoch, stream)):
                if processed < len(rnd.order):
                    return epoch, r, processed
                processed -= len(rnd.order)
            epoch += 1

    def normalize(self, stream: int, position: Position) -> Position:
        """The same position, moved past finished rounds and epochs (so its epoch has groups left)."""
        epoch, r, j = position
        while True:
            rounds = self.rounds(epoch, stream)
            while r < len(rounds) and j >= len(rounds[r].order):
                r, j = r + 1, 0
            if r < len(rounds):
                return epoch, r, j
            epoch, r, j = epoch + 1, 0, 0

    def remainder(self, positions: dict[int, Position]) -> tuple[int, Starts]:
        """Given every stream's position, the first epoch with groups left and what is consumed from it on."""
        starts = {e: dict(m) for e, m in self.starts.items()}
        positions = {s: self.normalize(s, p) for s, p in positions.items()}
        for stream, (epoch, r, j) in positions.items():
            for e in range(self.base_epoch, epoch + 1):
                rounds = self.rounds(e, stream)
                for ri, rnd in enumerate(rounds[: r + 1] if e == epoch else rounds):
                    if e == epoch and ri == r:  # the round in progress: its first j groups
                        done = np.bincount(rnd.order[:j], minlength=len(rnd.slots))
                    else:
                        done = [slot.stop - slot.start for slot in rnd.slots]
                    for slot, count in zip(rnd.slots, done):
                        if count:
                            starts.setdefault(e, {})[slot.shard] = slot.start + int(count)
        first = min(epoch for epoch, _, _ in positions.values())
        return first, {e: m for e, m in starts.items() if e >= first}

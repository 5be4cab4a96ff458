"""SequenceLoader: batches of same-class image sequences streamed from class-bucketed shards.

    loader = SequenceLoader("s3://bucket/digits", seq_len=5, batch_size=64, rank=r, world_size=w,
                            storage_options={"client_kwargs": {"endpoint_url": URL}})
    for x, y in loader:      # endless; x float32 (B, seq_len, C, H, W), y int64 (B,)
        ...

Each row of x holds seq_len distinct images of class y (pixels in [-1, 1], or latents
(mean + exp(logvar / 2) * eps) * scaling_factor using the stored flip moments for flipped images);
every image is flipped horizontally with probability 1/2.

Streams. Rank r runs V = max(num_workers, 1) streams (one per DataLoader worker). Each batch is the
concatenation of one micro-batch from each of the rank's V streams, in worker order (worker w gives
batch_size // V sequences, plus one if w < batch_size % V). See :mod:`arflow.data.plan` for how
shards are dealt to streams and sequences drawn.

Epoch. An epoch is one pass of the plan: ``sequences_per_epoch`` sequences (G), the same for every
epoch, world size and worker count (proportional: every stored sample once, except fewer than
seq_len per shard; uniform: the same number of sequences for every class). Each stream moves on to
the next epoch as soon as it has emitted its share of the current one, so the stream never pauses
and a batch can straddle two epochs. ``epoch_length`` = G // (world_size * batch_size) is the number
of batches per rank in which the whole world consumes one epoch's worth of sequences.

Randomness is a function of (seed, epoch, shard, group) for the content of a sequence (members,
flips, latent noise) and of (seed, epoch, layout, stream, round) for the order, so two loaders built
with the same arguments yield identical batches.

Resume. ``state_dict()`` records what the caller has received (batches handed out, not batches
prefetched by workers): per stream its plan position, plus the batch count. ``load_state_dict``:

- Same world size, num_workers, batch_size and open_shards: the next ``iter(loader)`` yields exactly
  the batches the uninterrupted loader would have yielded next (test: 50 batches, 2 ranks x 2
  workers). A rank normally loads its own state; it may load another rank's, whose batch count
  then determines its positions (exact as long as no sequence was dropped for a bad sample).
- Anything of those changed (a different world size, say): every new rank loads the state of any one
  old rank (e.g. rank 0's). The positions of *all* old streams after the recorded number of batches
  are recomputed, and what remains of the epochs in flight (usually one; two when some streams had
  already entered the next) is re-planned over the new streams; later epochs are planned as usual.
  Guarantee: every sequence of those epochs that the old world had not consumed is emitted exactly
  once by the new world, and none it had consumed is emitted again; the sequences themselves
  (members, flips, noise) are the ones the old world would have produced. Assumptions: every old
  rank consumed the same number of batches (true in synchronous data-parallel training, where all
  ranks step together); sequences dropped for bad samples before the checkpoint are not known to
  the recomputation, which then places each stream that many sequences too early (those may be
  emitted twice). Bad-sample counts restart at 0.
- seq_len, class_sampling, seed, window, min_per_class and the shard set must be unchanged: they
  define what an epoch holds (a ValueError names the difference).

Start-up. Every rank parses the manifest into columns (:class:`arflow.data.manifest.ShardTable`)
and plans what each epoch holds (sequences per shard, O(shards log shards)); each DataLoader
worker deals the epoch's shards to the streams (O(shards log streams), the one step that spans
the world), derives only its own stream's rounds from the deal, and a shard's groups when it
opens the shard (:mod:`arflow.data.plan`). Given ``share`` (a function that runs a callable on
rank 0 and returns its result, or raises its error, on every rank; the trainer passes
``arflow.distributed.collectives.main_then_share``), rank 0 alone reads the manifest and lists
the shard directory, and the other ranks make no storage request before their workers open their
first shards; without it each rank does both itself. ``benchmarks/startup.py`` measures this for
a 1,024-rank x 8-worker ImageNet-21k job.

Object storage. A stream opens all shards of a round at once and the next round's when a quarter
of the current one is left; on an object store each open shard is downloaded by a thread of its
own in 8 MiB ranged requests, one part ahead of the reader (``arflow.data.shards.open_shard``;
no HEAD request: the size comes from the manifest), so first-byte latency overlaps with decoding.
Throttling (503 SlowDown, honouring Retry-After) and dropped connections are retried from the
byte reached; they change nothing in what is emitted (``tests/test_data_storage.py`` reads an
epoch through a proxy failing a quarter of the requests). ``benchmarks/data_throughput.py
--latency-ms 25`` measures the rate through cloud-like latency.

Bad input. A missing, invalid or unknown-version manifest raises ManifestError naming its URL; a
class with fewer than seq_len samples raises ManifestError naming it (or is dropped with a warning
when ``min_per_class`` is given); a consumer expectation (``expect_shape`` / ``expect_encoding``)
not met raises ManifestError naming both. Shards listed in the manifest that do not exist raise
ShardError naming all of them when the loader is built (one listing of the shard directory), and
a shard deleted later when a stream reaches it. A corrupt or truncated shard member is skipped
with a BadSampleWarning naming shard and member, and the sequences using it are dropped
(``bad_samples`` counts them); past ``max_bad_samples`` (per stream, and summed per rank) a
ShardError stops the run. A shard that
decodes but does not hash to the manifest's sha256 raises ShardError. Unreachable storage or wrong
credentials raise StorageError naming the URL after bounded retries (see :mod:`arflow.storage`).
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from arflow.data.errors import ManifestError, ShardError
from arflow.data.manifest import Manifest, manifest_url, parse_manifest, read_manifest
from arflow.data.plan import Layout, PlanConfig, Planner, PlanView, Position
from arflow.data.sequences import ReadOptions, SequenceStream, Slots
from arflow.data.shards import check_shards
from arflow.internals.torch import shutdown_workers
from arflow.storage import RetryPolicy
from arflow.utils.signals import data_worker_signals

T = TypeVar("T")
STATE_FORMAT = 1
DROP_ADVICE = (
    "to drop such classes, set min_per_class (data.min_per_class in a training config) to at "
    "least seq_len"
)


class SequenceLoader:
    """Endless iterable of (x (B, seq_len, C, H, W) float32, y (B,) int64) for one rank.

    ``iter(loader)`` continues from what has been consumed (or loaded) so far; use one live iterator
    at a time. Attributes: ``manifest``, ``layout``, ``sequences_per_epoch``, ``epoch_length``,
    ``plan`` (the :class:`PlanView` the streams follow), ``startup_s`` (seconds the constructor
    spent on the manifest (reading, or receiving it, and parsing), the plan, and the shard check).

    With ``return_meta`` each item gains a third element {"sample_ids": int64 (B, seq_len) (index of
    each image in manifest order: shard offset + position in shard), "epoch": int64 (B,)}.
    """

    def __init__(
        self,
        url: str,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        class_sampling: str = "uniform",
        storage_options: dict | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        min_per_class: int | None = None,
        open_shards: int = 8,
        window: int = 128,
        max_bad_samples: int = 100,
        verify_checksums: bool = True,
        expect_shape: tuple[int, int, int] | None = None,
        expect_encoding: str | None = None,
        return_meta: bool = False,
        retry: RetryPolicy | None = None,
        share: Callable[[Callable[[], T]], T] | None = None,
    ):
        if seq_len < 1 or batch_size < 1 or num_workers < 0 or open_shards < 1 or window < 1:
            raise ValueError(
                "seq_len, batch_size, open_shards and window must be >= 1, num_workers >= 0"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if class_sampling not in ("uniform", "proportional"):
            raise ValueError(
                f"class_sampling must be 'uniform' or 'proportional', not {class_sampling!r}"
            )
        streams_per_rank = max(num_workers, 1)
        if batch_size < streams_per_rank:
            raise ValueError(
                f"batch_size {batch_size} < num_workers {num_workers}: every worker contributes "
                f"batch_size // num_workers sequences to each batch"
            )
        if min_per_class is not None and min_per_class < seq_len:
            raise ValueError(
                f"min_per_class {min_per_class} < seq_len {seq_len}: such classes cannot form a sequence"
            )
        retry = retry or RetryPolicy()
        share = share or _run_here
        self._live = None  # the DataLoader iterator of the current __iter__
        clock = [time.perf_counter()]
        raw = share(lambda: read_manifest(url, storage_options, retry))
        self.manifest: Manifest = parse_manifest(raw, manifest_url(url))
        clock.append(time.perf_counter())
        self._check_expectations(expect_shape, expect_encoding)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batch_size, self.seq_len = batch_size, seq_len
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.max_bad_samples = max_bad_samples
        self._plan_key = {
            "seq_len": seq_len,
            "class_sampling": class_sampling,
            "seed": seed,
            "window": window,
            "min_per_class": min_per_class,
        }
        self._options = ReadOptions(
            storage_options, retry, verify_checksums, max_bad_samples, return_meta
        )

        shards = self.manifest.shards
        usable = self._kept_classes(min_per_class)[shards.class_ids]
        short = np.flatnonzero(usable & (shards.counts < seq_len))
        if len(short):
            s = shards[int(short[0])]
            raise ManifestError(
                f"manifest {self.manifest.url}: shard {s.url} of class {self.manifest.class_names[s.class_id]!r} "
                f"holds {s.count} samples, fewer than seq_len={seq_len} (sequences never span shards); "
                f"rewrite the shards with a larger --shard-size"
            )
        self._planner = Planner(
            shards.counts,
            shards.class_ids,
            usable,
            PlanConfig(seq_len, class_sampling, seed, window),
        )
        self.layout = Layout(world_size, streams_per_rank, batch_size, open_shards)
        producing = int((self._planner.groups_per_shard > 0).sum())
        if producing < self.layout.num_streams:
            raise ManifestError(
                f"manifest {self.manifest.url}: {producing} shards give sequences, fewer than the "
                f"world_size x max(num_workers, 1) = {self.layout.num_streams} data streams; write smaller "
                f"shards (make_shards --shard-size) or use fewer workers"
            )
        clock.append(time.perf_counter())
        # Before training: every shard the world may read is there (one listing, by rank 0 alone
        # when the ranks share).
        used = np.flatnonzero(self._planner.groups_per_shard > 0).tolist()
        share(
            lambda: check_shards(
                [shards[i] for i in used], self.manifest.root, storage_options, retry
            )
        )
        clock.append(time.perf_counter())
        self.startup_s = dict(zip(("manifest", "plan", "shard_check"), np.diff(clock).tolist()))
        self.sequences_per_epoch = self._planner.sequences_per_epoch
        self.epoch_length = self.sequences_per_epoch // (world_size * batch_size)
        if self.epoch_length == 0:
            raise ManifestError(
                f"manifest {self.manifest.url}: one epoch holds {self.sequences_per_epoch} "
                f"sequences, less than one batch per rank ({world_size} x {batch_size})"
            )
        self._start(
            PlanView(self._planner, self.layout),
            batches=0,
            positions=[(0, 0, 0)] * streams_per_rank,
            bad=[0] * streams_per_rank,
        )

    # -- setup ---------------------------------------------------------------------------------

    def _check_expectations(self, shape, encoding) -> None:
        m = self.manifest
        wrong = []
        if shape is not None and tuple(shape) != tuple(m.sample_shape):
            wrong.append(
                f"sample shape {list(m.sample_shape)} but the consumer asked for {list(shape)}"
            )
        if encoding is not None and encoding != m.encoding:
            wrong.append(f"encoding {m.encoding!r} but the consumer asked for {encoding!r}")
        if wrong:
            raise ManifestError(f"manifest {m.url} has " + " and ".join(wrong))

    def _kept_classes(self, min_per_class: int | None) -> np.ndarray:
        """(classes,) bool: the classes planned; raises or warns about the others."""
        m = self.manifest
        need = self.seq_len if min_per_class is None else min_per_class
        small = np.flatnonzero(np.array(m.counts) < need).tolist()
        listed = ", ".join(f"{m.class_names[c]!r} (id {c}, {m.counts[c]} samples)" for c in small)
        if small and min_per_class is None:
            raise ManifestError(
                f"manifest {m.url}: class {listed} has fewer than seq_len={self.seq_len} samples; "
                f"{DROP_ADVICE}"
                if len(small) == 1
                else f"manifest {m.url}: classes {listed} have fewer than seq_len={self.seq_len} samples; "
                f"{DROP_ADVICE}"
            )
        if small:
            warnings.warn(
                f"{m.url}: dropping {len(small)} classes with fewer than min_per_class={min_per_class} "
                f"samples: {listed}",
                stacklevel=3,
            )
        if len(small) == len(m.counts):
            raise ManifestError(f"manifest {m.url}: no class has {need} samples")
        kept = np.ones(len(m.counts), dtype=bool)
        kept[small] = False
        return kept

    def _start(
        self, view: PlanView, batches: int, positions: list[Position], bad: list[int]
    ) -> None:
        self._view, self._batches = view, batches
        self._positions, self._bad = [tuple(p) for p in positions], list(bad)

    @property
    def plan(self) -> PlanView:
        return self._view

    def _local_streams(self) -> range:
        first = self.rank * self.layout.streams_per_rank
        return range(first, first + self.layout.streams_per_rank)

    # -- iteration -----------------------------------------------------------------------------

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far in what this rank has received (a plain int)."""
        return sum(self._bad)

    def close(self) -> None:
        """Stop the live iterator's worker processes now, not when it is garbage-collected (on an
        error path a traceback can keep it alive for as long as the process lives)."""
        live, self._live = self._live, None
        if live is not None:
            shutdown_workers(live)

    def __iter__(self) -> Iterator[tuple]:
        self.close()  # one live iterator at a time
        workers = self.num_workers
        layout = self.layout
        rows = [layout.micro_batch(s) for s in self._local_streams()]
        shape = (self.seq_len, *self.manifest.sample_shape)
        depth = self.prefetch_factor + 1 if workers else 1
        slots = Slots(layout.streams_per_rank, depth, max(rows), shape, shared=workers > 0)
        stream = SequenceStream(
            self.manifest,
            self._view,
            self.rank,
            list(self._positions),
            list(self._bad),
            self._options,
            slots,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            collate_fn=_as_is,  # not default_convert: the small numpy parts stay inline
            worker_init_fn=data_worker_signals,  # outlive a job-wide SIGTERM while saving
        )
        self._live = iter(loader)
        return self._batches_from(self._live, slots, rows, shape)

    def _batches_from(self, parts_iter, slots: Slots, rows: list[int], shape) -> Iterator[tuple]:
        pin = self.pin_memory and torch.cuda.is_available()
        for index in itertools.count():
            parts = [next(parts_iter) for _ in self._local_streams()]
            for w, (part_index, _, (epoch, r, j, bad), _) in enumerate(parts):
                if part_index != index:  # the slots would be read out of order
                    raise RuntimeError(
                        f"data worker {w} sent micro-batch {part_index}, not {index}"
                    )
                self._positions[w], self._bad[w] = (epoch, r, j), bad
            self._batches += 1
            if sum(self._bad) > self.max_bad_samples:
                raise ShardError(
                    f"{sum(self._bad)} bad samples on rank {self.rank} exceed "
                    f"max_bad_samples={self.max_bad_samples} (see the BadSampleWarnings)"
                )
            # numpy, not torch.cat: torch's intra-op threads contend with the training step for cores
            x = slots.batch(index, rows, torch.empty((sum(rows), *shape), pin_memory=pin))
            y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
            y = y.pin_memory() if pin else y
            if self._options.return_meta:
                meta = {k: np.concatenate([p[3][k] for p in parts]) for k in parts[0][3]}
                yield x, y, {k: torch.from_numpy(v) for k, v in meta.items()}
            else:
                yield x, y

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What the caller has consumed so far: small, plain Python values (torch.save- and JSON-able)."""
        return {
            "format": STATE_FORMAT,
            "manifest": self.manifest.fingerprint(),
            "plan": dict(self._plan_key),
            "layout": {
                "world_size": self.layout.world_size,
                "streams_per_rank": self.layout.streams_per_rank,
                "batch_size": self.layout.batch_size,
                "open_shards": self.layout.open_shards,
            },
            "rank": self.rank,
            "base_epoch": self._view.base_epoch,
            "starts": [
                [e, shard, start]
                for e, m in sorted(self._view.starts.items())
                for shard, start in sorted(m.items())
            ],
            "batches": self._batches,
            "positions": [list(p) for p in self._positions],
            "bad_samples": list(self._bad),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from any rank; see the module docstring for the guarantees).
        An iterator made before is closed: the next ``iter(loader)`` continues from ``state``."""
        self.close()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"unknown loader state format {state.get('format')!r}; expected {STATE_FORMAT}"
            )
        if state["manifest"] != self.manifest.fingerprint():
            raise ValueError(
                f"the loader state belongs to another shard set than {self.manifest.url}"
            )
        differ = {
            k: (state["plan"].get(k), v)
            for k, v in self._plan_key.items()
            if state["plan"].get(k) != v
        }
        if differ:
            raise ValueError(
                "the loader state was saved with different "
                + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in differ.items())
            )
        old = Layout(**state["layout"])
        starts: dict[int, dict[int, int]] = {}
        for epoch, shard, start in state["starts"]:
            starts.setdefault(epoch, {})[shard] = start
        old_view = PlanView(self._planner, old, state["base_epoch"], starts)
        batches = state["batches"]
        if old == self.layout:
            if state["rank"] == self.rank:
                positions, bad = state["positions"], state["bad_samples"]
            else:
                positions = [
                    old_view.locate(s, batches * old.micro_batch(s)) for s in self._local_streams()
                ]
                bad = [0] * len(positions)
            self._start(old_view, batches, positions, bad)
            return
        every = {
            s: old_view.locate(s, batches * old.micro_batch(s)) for s in range(old.num_streams)
        }
        first, remaining = old_view.remainder(every)
        streams = self.layout.streams_per_rank
        self._start(
            PlanView(self._planner, self.layout, first, remaining),
            0,
            [(first, 0, 0)] * streams,
            [0] * streams,
        )


def _as_is(item):
    return item


def _run_here(fn: Callable[[], T]) -> T:
    """``share`` without peers: this rank does the work itself."""
    return fn()

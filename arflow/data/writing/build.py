"""Building a class-bucketed shard set: the library behind tools/make_shards.py.

Each class's images are shuffled (seeded), then split into near-equal shards of at most
``shard_size`` bytes, so a big class spans several shards and no shard is much smaller than the
others. A shard is written under a temporary name and renamed when complete (on S3, where an upload
is invisible until complete, in place; see ``arflow.storage.partial_path``), and a small sidecar
``<shard>.json`` records its checksum and a fingerprint of what went into it; a re-run skips every
shard whose sidecar fingerprint matches and whose bytes still hash to the recorded sha256, so an
interrupted run resumes where it stopped. The manifest is written last, by rank 0 alone.

One build per output: rank 0 holds the output's lock (`.arflow.lock` beside the manifest: flock on
a local or shared file system, a heartbeated object written with conditional requests on S3) from
before the first shard until the manifest is written, and a second build on the same output is
refused, on every rank, with a message naming the holder (two builds would move each other's
temporary files away mid-write).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from arflow.data.manifest import MANIFEST_NAME, VERSION, Manifest, ShardInfo
from arflow.data.shards import record_bytes, sample_key, write_shard
from arflow.data.writing.encoders import PixelEncoder, VaeEncoder
from arflow.data.writing.sources import DigitsSource, ImageFolderSource
from arflow.storage import (
    RetryingReader,
    RetryPolicy,
    RunLockedError,
    directory_lock,
    join_url,
    read_bytes,
    write_atomic,
)

log = logging.getLogger("arflow.data")


class OutputInUseError(RuntimeError):
    """Another build holds the output."""


Source = DigitsSource | ImageFolderSource
Encoder = PixelEncoder | VaeEncoder


@dataclass(frozen=True)
class ShardJob:
    class_id: int
    path: str  # relative to the output root
    items: tuple  # source item references, in stored order
    first_index: int  # index within the (shuffled) class of the first item, for sample keys
    fingerprint: str  # of everything that determines the shard's content


def plan_jobs(
    classes: list[tuple[int, list]], samples_per_shard: int, seed: int, describe: dict
) -> list[ShardJob]:
    """Split each class (id, items) into ceil(n / samples_per_shard) shards of near-equal size."""
    jobs = []
    for class_id, items in classes:
        order = np.random.default_rng([seed, class_id]).permutation(len(items))
        parts = np.array_split(order, math.ceil(len(items) / samples_per_shard))
        first = 0
        for j, part in enumerate(parts):
            chosen = tuple(items[i] for i in part)
            text = json.dumps(
                {"version": VERSION, "class_id": class_id, "items": chosen, **describe},
                sort_keys=True,
            )
            jobs.append(
                ShardJob(
                    class_id,
                    f"shards/c{class_id:05d}_{j:04d}.tar",
                    chosen,
                    first,
                    hashlib.sha256(text.encode()).hexdigest(),
                )
            )
            first += len(part)
    return jobs


def build_shards(
    source: Source,
    encoder: Encoder,
    out: str,
    *,
    shard_size: int = 256 * 2**20,
    min_per_class: int | None = None,
    workers: int = 1,
    seed: int = 0,
    storage_options: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list] = lambda records: [records],
    progress: bool = True,
    retry: RetryPolicy = RetryPolicy(),
) -> Manifest | None:
    """Write the shards of this rank's classes (class_id % world_size == rank); rank 0 writes the manifest.

    ``gather(obj)`` returns every rank's ``obj`` (all ranks call it; torch.distributed's
    all_gather_object under torchrun); it is also what makes rank 0 wait for the others.
    Returns the manifest on rank 0, None on other ranks. Raises OutputInUseError on every rank
    when another build holds ``out``.
    """
    with _owned_output(out, storage_options, retry, rank, gather) as lock:
        kept, dropped = [], []
        for name, items in source.classes:
            if min_per_class is not None and len(items) < min_per_class:
                dropped.append({"name": name, "count": len(items)})
            elif not items:
                raise ValueError(
                    f"class {name!r} of {source.name} has no images; pass --min-per-class 1 to drop it"
                )
            else:
                kept.append((name, items))
        if dropped and rank == 0:
            log.warning(
                "dropping %d classes with fewer than %d images (--min-per-class): %s",
                len(dropped),
                min_per_class,
                ", ".join(f"{d['name']} ({d['count']})" for d in dropped),
            )
        if not kept:
            raise ValueError(f"no class of {source.name} has at least {min_per_class} images")

        per_sample = record_bytes(len(kept) - 1, encoder.dtype, encoder.stored_shape)
        samples_per_shard = max(
            1, (shard_size - 1024) // per_sample
        )  # 1024: the tar end-of-archive blocks
        describe = {
            "source": source.name,
            "image_size": source.image_size,
            "preprocessing": source.preprocessing,  # a changed crop rewrites the shards
            **encoder.describe(),
        }
        jobs = plan_jobs(
            [(c, items) for c, (_, items) in enumerate(kept)], samples_per_shard, seed, describe
        )
        mine = [job for job in jobs if job.class_id % world_size == rank]

        records = []
        bar = tqdm(
            total=sum(len(j.items) for j in mine),
            unit="img",
            disable=not progress,
            desc=f"shards (rank {rank}/{world_size})" if world_size > 1 else "shards",
        )
        skipped = 0
        with _pool(workers) as pool:
            if isinstance(encoder, PixelEncoder) and pool is not None:
                # Pixels: whole shards in parallel processes (decode, resize, write, upload).
                futures = {
                    pool.submit(_make_shard, job, source, encoder, out, storage_options, retry): job
                    for job in mine
                }
                done = (f.result() for f in as_completed(futures))
            else:
                # VAE: one encoder in this process (GPU when present); images decoded by the pool.
                done = (
                    _make_shard(job, source, encoder, out, storage_options, retry, pool)
                    for job in mine
                )
            for record, was_skipped in done:
                records.append(record)
                skipped += was_skipped
                bar.update(record["count"])
                bar.set_postfix(skipped_shards=skipped)
        bar.close()

        everything = [r for part in gather(records) for r in part]
        if rank != 0:
            return None
        everything.sort(key=lambda r: r["path"])
        manifest = Manifest(
            url=join_url(out, MANIFEST_NAME),
            version=VERSION,
            class_names=[name for name, _ in kept],
            counts=[len(items) for _, items in kept],
            sample_shape=encoder.sample_shape,
            encoding=encoder.encoding,
            stored_dtype=encoder.dtype,
            stored_shape=encoder.stored_shape,
            scaling_factor=encoder.scaling_factor,
            shards=[
                ShardInfo(
                    join_url(out, r["path"]),
                    r["path"],
                    r["class_id"],
                    r["count"],
                    r["bytes"],
                    r["sha256"],
                )
                for r in everything
            ],
            image_size=source.image_size,
            source=source.name,
            dropped_classes=dropped,
        )
        if lock.lost:  # another build took the output over: the manifest is its to write
            raise OutputInUseError(
                f"lost the lock of {out} to another build; this one stops without writing the "
                f"manifest"
            )
        write_atomic(
            manifest.url, json.dumps(manifest.to_dict(), indent=1).encode(), storage_options, retry
        )
        return manifest


@contextlib.contextmanager
def _owned_output(
    out: str,
    storage_options: dict | None,
    retry: RetryPolicy,
    rank: int,
    gather: Callable[[Any], list],
) -> Iterator:
    """Rank 0 holds the output's lock for the block (others get None). Every rank learns through
    ``gather`` whether rank 0 got it, so that a refused build stops on every rank alike."""
    lock, refusal = None, None
    if rank == 0:
        lock = directory_lock(
            out,
            uuid.uuid4().hex[:8],
            storage_options,
            retry,
            what="make_shards",
            purpose="two builds on one output would move each other's temporary files away "
            "mid-write. Wait for it to end (a re-run then skips its complete shards), stop it, "
            "or choose another --out",
        )
        try:
            lock.acquire()
        except RunLockedError as err:
            lock, refusal = None, str(err)
    refusals = [r for r in gather(refusal) if r]
    if refusals:
        raise OutputInUseError(refusals[0])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


class _NoPool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pool(workers: int) -> ProcessPoolExecutor | _NoPool:
    if workers <= 1:
        return _NoPool()
    # A forked child must not inherit an initialised CUDA context (the VAE on GPU): spawn then.
    context = multiprocessing.get_context("spawn") if torch.cuda.is_initialized() else None
    return ProcessPoolExecutor(workers, mp_context=context)


def _make_shard(
    job: ShardJob,
    source: Source,
    encoder: Encoder,
    out: str,
    storage_options: dict | None,
    retry: RetryPolicy,
    pool: Executor | None = None,
) -> tuple[dict, bool]:
    """Write one shard unless an identical complete one exists. Returns (record, skipped)."""
    url = join_url(out, job.path)
    record = _complete_record(url, job, storage_options, retry)
    if record is not None:
        return record, True
    loaded = (
        pool.map(source.load, job.items, chunksize=16)
        if pool is not None
        else map(source.load, job.items)
    )
    arrays = encoder.encode(np.stack(list(loaded)))
    keys = [sample_key(job.class_id, job.first_index + i) for i in range(len(job.items))]
    size, sha = write_shard(url, job.class_id, list(arrays), keys, storage_options, retry)
    record = {
        "path": job.path,
        "class_id": job.class_id,
        "count": len(job.items),
        "bytes": size,
        "sha256": sha,
        "fingerprint": job.fingerprint,
    }
    write_atomic(url + ".json", json.dumps(record).encode(), storage_options, retry)
    return record, False


def _complete_record(
    url: str, job: ShardJob, storage_options: dict | None, retry: RetryPolicy
) -> dict | None:
    """The sidecar record of an existing shard if it is complete, identical in plan, and intact."""
    try:
        record = json.loads(read_bytes(url + ".json", storage_options, retry))
        reader = RetryingReader(url, storage_options, retry)
    except (FileNotFoundError, ValueError):
        return None
    try:
        reader.read_to_end()
    finally:
        reader.close()
    intact = (reader.sha256.hexdigest(), reader.position) == (
        record.get("sha256"),
        record.get("bytes"),
    )
    if record.get("fingerprint") != job.fingerprint or not intact:
        log.warning(
            "rewriting %s: %s",
            url,
            "its inputs changed" if intact else "its checksum does not match",
        )
        return None
    return record

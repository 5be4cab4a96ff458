"""The start-up of a 1,024-rank x 8-worker job on ImageNet-21k, simulated on one machine.

    python benchmarks/startup.py            # 21,841 classes, 14.2 M samples, 1,024 ranks x 8 workers
    python benchmarks/startup.py --quick    # the same at a test's size (seconds, not minutes)

Shard set. ``--classes`` class sizes drawn log-normally (median 650, clipped to [10, 3000]) and
rescaled to ``--samples`` in total; each class split as make_shards splits it: ceil(n / k) shards
of near-equal size, k the samples that fit ``--shard-size`` at the per-sample size of 256-px SD-VAE
latents (make_shards' formula), named ``shards/cCCCCC_NNNN.tar``, each with its ``.json`` sidecar.
The manifest is written as make_shards writes it. Every shard and sidecar exists on a moto S3
server this script starts on loopback (data_throughput.moto_endpoint); most are empty (no image data) and carry placeholder
sizes and checksums in the manifest, except the shards the measured ranks read for their first
batches, which hold real samples (tiny 3x4x4 pixel arrays) and their real checksums.

Per measured rank (``--ranks``), in a fresh process, exactly as a rank of the job does it:
``SequenceLoader(url, rank=r, world_size=W, num_workers=V, share=...)``. Rank 0 reads the manifest
and lists the shard directory; the other ranks receive rank 0's results through ``share`` (here
replayed from rank 0's run: the broadcast itself is not timed). Reported: its ``startup_s``
(manifest, plan, shard check), the peak RSS growth over the process's size after imports, the
storage requests the rank made (counted in the S3 server's request log), then the time to its
first batch and the requests its V workers made until the first batch arrived (real DataLoader
workers; they prefetch, so the count is bounded by the shards they open, not exact). Per sampled
worker (``--worker-samples``), in a process forked from the rank after its start-up as the
DataLoader forks its workers: the time to build the worker's whole epoch plan (the epoch's deal,
its rounds, the groups of every shard it reads) and its private memory growth (USS).

Resize: a rank of a job restarted at W - 8 ranks (one 8-GPU node lost) loads a state saved at W
ranks half-way through the epoch (``load_state_dict``: positions of all old streams, re-plan of
the rest of the epoch).

Exactly once: over ALL W x V stream plans of epoch 0, for both class samplings, every planned
sequence (shard, group) is emitted by exactly one stream exactly once; and for proportional
sampling every sample is read exactly once except the (count mod seq_len) per shard the plan
leaves out by design (uniform sampling draws a fixed number of sequences per class, so samples
recur in small classes and are skipped in large ones). Reported with the time the check takes.

Prints one JSON document. Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from data_throughput import moto_endpoint  # a sibling script: benchmarks/ is on the path

from arflow.data import SequenceLoader
from arflow.data.manifest import MANIFEST_NAME, VERSION, Manifest, ShardInfo
from arflow.data.plan import Layout, PlanConfig, Planner, PlanView
from arflow.data.shards import record_bytes, sample_key, write_shard

BUCKET, PREFIX = "bench", "imagenet21k"  # data_throughput.moto_endpoint's bucket
ROOT = f"s3://{BUCKET}/{PREFIX}"
PIXELS = (3, 4, 4)  # the stored (and yielded) sample of the synthetic set: uint8 pixels
LATENT_STORED = ("float32", (2, 8, 32, 32))  # what a 256-px SD-VAE shard holds per sample
FULL = dict(
    classes=21_841,
    samples=14_197_122,
    shard_size=256 * 2**20,  # make_shards' default: one shard per class, 3,971 samples at most
    world_size=1024,
    workers=8,
    batch_size=32,
)
QUICK = dict(
    classes=60, samples=12_000, shard_size=8 * 2**20, world_size=4, workers=2, batch_size=8
)
TARGETS = {"parse_plus_plan_s": 10.0, "rss_growth_mb": 500.0}
SAMPLINGS = ("uniform", "proportional")


# -- the synthetic shard set ----------------------------------------------------------------------


def class_sizes(classes: int, samples: int, seed: int) -> np.ndarray:
    """(classes,) int64 sizes summing to ``samples``: log-normal, median 650, within [10, 3000]."""
    rng = np.random.default_rng(seed)
    raw = np.clip(rng.lognormal(np.log(650), 0.7, classes), 10, 3000)
    sizes = np.maximum(10, np.floor(raw * samples / raw.sum())).astype(np.int64)
    missing = samples - int(sizes.sum())  # lost rounding down, or added by the floor of 10
    largest = np.argsort(-sizes, kind="stable")
    np.add.at(sizes, largest[np.arange(abs(missing)) % classes], np.sign(missing))
    return sizes


def shard_layout(sizes: np.ndarray, shard_size: int) -> tuple[list[str], list[int], list[int], int]:
    """make_shards' split of each class: (paths, class ids, counts, samples per shard)."""
    dtype, shape = LATENT_STORED
    per_shard = max(1, (shard_size - 1024) // record_bytes(len(sizes) - 1, dtype, shape))
    paths, classes, counts = [], [], []
    for c, n in enumerate(sizes.tolist()):
        k = math.ceil(n / per_shard)
        for j in range(k):  # np.array_split's sizes: the first n % k parts one larger
            paths.append(f"shards/c{c:05d}_{j:04d}.tar")
            classes.append(c)
            counts.append(n // k + (j < n % k))
    return paths, classes, counts, per_shard


def first_batch_shards(view: PlanView, streams: list[int], groups_needed: int) -> set[int]:
    """The shards the streams open before each has emitted ``groups_needed`` groups (whole rounds)."""
    shards = set()
    for stream in streams:
        emitted = 0
        for rnd in view.rounds(0, stream):
            shards.update(slot.shard for slot in rnd.slots)
            emitted += len(rnd.order)
            if emitted >= groups_needed:
                break
    return shards


# -- the loopback S3 server and its request log -----------------------------------------------------


class RequestLog:
    """The S3 requests in the server's log (one line per request, written before the answer)."""

    LINE = re.compile(rb'"(?:\x1b\[[\d;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/')

    def __init__(self, path: str):
        self.path = path

    def mark(self) -> int:
        return os.path.getsize(self.path)

    def since(self, mark: int) -> Counter:
        """Requests logged after ``mark`` by kind: LIST, or the HTTP method."""
        with open(self.path, "rb") as f:
            f.seek(mark)
            text = f.read()
        return Counter(
            "LIST" if b"list-type=2" in target else method.decode()
            for method, target in self.LINE.findall(text)
        )


def write_shard_set(endpoint: str, sizes, paths, classes, counts, real: set[int], seed: int):
    """Every shard and sidecar as an object (real samples for the shards in ``real``, empty
    otherwise), then the manifest as make_shards writes it (placeholder sizes and checksums for
    the empty shards). Returns the manifest's bytes."""
    import boto3
    import botocore.config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(max_pool_connections=32),
    )
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    rng = np.random.default_rng(seed)
    per_sample = record_bytes(max(classes), "uint8", PIXELS)
    infos = []
    for i, (path, count, c) in enumerate(zip(paths, counts, classes)):
        url = f"{ROOT}/{path}"
        if i in real:
            arrays = list(rng.integers(0, 256, (count, *PIXELS), dtype=np.uint8))
            size, sha = write_shard(
                url, c, arrays, [sample_key(c, k) for k in range(count)], options
            )
        else:
            size, sha = count * per_sample + 1024, hashlib.sha256(path.encode()).hexdigest()
        infos.append(ShardInfo(url, path, c, count, size, sha))
    empty = [p for i, p in enumerate(paths) if i not in real]
    keys = [f"{PREFIX}/{p}.json" for p in paths] + [f"{PREFIX}/{p}" for p in empty]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b""), keys))
    manifest = Manifest(
        url=f"{ROOT}/{MANIFEST_NAME}",
        version=VERSION,
        class_names=[f"n{c:08d}" for c in range(len(sizes))],
        counts=sizes.tolist(),
        sample_shape=PIXELS,
        encoding="pixels",
        stored_dtype="uint8",
        stored_shape=PIXELS,
        scaling_factor=None,
        shards=infos,
        image_size=256,
        source="synthetic ImageNet-21k layout",
    )
    text = json.dumps(manifest.to_dict(), indent=1).encode()  # as make_shards writes it
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{MANIFEST_NAME}", Body=text)
    return text


# -- one rank, in a fresh process -----------------------------------------------------------------


class RecordShare:
    """Rank 0's ``share``: do the work, and record each result (or error) for the other ranks."""

    def __init__(self, path: str):
        self.path, self.results = path, []

    def __call__(self, fn):
        try:
            result = fn()
        except Exception as err:
            self.results.append(err)
            raise
        self.results.append(result)
        with open(self.path, "wb") as f:
            pickle.dump(self.results, f)
        return result


class ReplayShare:
    """Another rank's ``share``: rank 0's results, in the order rank 0 produced them."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.results = iter(pickle.load(f))

    def __call__(self, fn):
        result = next(self.results)
        if isinstance(result, BaseException):
            raise result
        return result


def reset_peak_rss() -> float:
    """Reset the process's peak RSS (Linux: VmHWM) to its current RSS; returns that, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak RSS since the last reset, MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


def worker_plan(loader: SequenceLoader, worker: int) -> dict:
    """Build one worker's whole epoch-0 plan in a process forked from the rank, as DataLoader
    forks its workers: the deal, the stream's rounds, the groups of each of its shards."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read)
        gc.collect()  # what the collector touches of the parent's objects becomes private
        me = psutil.Process()
        before = me.memory_full_info().uss
        started = time.perf_counter()
        stream = loader.rank * loader.layout.streams_per_rank + worker
        rounds = loader.plan.rounds(0, stream)
        slots = [slot for rnd in rounds for slot in rnd.slots]
        groups = [loader.plan.planner.groups(slot.shard, 0) for slot in slots]
        seconds = time.perf_counter() - started
        result = {
            "worker": worker,
            "plan_s": round(seconds, 4),
            "uss_growth_mb": round((me.memory_full_info().uss - before) / 2**20, 1),
            "rounds": len(rounds),
            "shards": len(slots),
            "sequences": int(sum(len(g.members) for g in groups)),
        }
        with os.fdopen(write, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as inp:
        result = json.load(inp)
    os.waitpid(pid, 0)
    return result


def measure_rank(spec: dict) -> dict:
    """What one rank does at start-up, measured (runs in its own process)."""
    import s3fs  # noqa: F401  (imported before the baseline: every rank has it loaded)

    log = RequestLog(spec["log"])
    rank = spec["rank"]
    share = RecordShare(spec["share"]) if rank == 0 else ReplayShare(spec["share"])
    baseline = reset_peak_rss()
    mark = log.mark()
    started = time.perf_counter()
    loader = SequenceLoader(spec["url"], rank=rank, share=share, **spec["loader"])
    total = time.perf_counter() - started
    peak = peak_rss_mb()
    requests = log.since(mark)
    result = {
        "rank": rank,
        "startup_s": {k: round(v, 4) for k, v in loader.startup_s.items()},
        "parse_plus_plan_s": round(loader.startup_s["manifest"] + loader.startup_s["plan"], 4),
        "total_s": round(total, 4),
        "rss_growth_mb": round(peak - baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "requests_at_startup": sum(requests.values()),
        "requests_at_startup_by_kind": dict(requests),
        "workers": [worker_plan(loader, w) for w in spec["worker_samples"]],
    }
    mark = log.mark()
    started = time.perf_counter()
    next(iter(loader))
    result["first_batch_s"] = round(time.perf_counter() - started, 3)
    loader.close()  # the workers stop; what they requested until now is in the log
    requests = log.since(mark)
    result["requests_to_first_batch"] = sum(requests.values())
    result["requests_to_first_batch_by_kind"] = dict(requests)
    return result


def measure_resize(spec: dict) -> dict:
    """A rank of a job restarted at a smaller world size loads a state saved half-way through
    epoch 0 by the larger world (runs in its own process)."""
    old = SequenceLoader(spec["url"], rank=0, share=ReplayShare(spec["share"]), **spec["loader"])
    state = old.state_dict()
    state["batches"] = old.epoch_length // 2  # every old rank consumed this many batches
    new_args = {**spec["loader"], "world_size": spec["new_world_size"]}
    new = SequenceLoader(spec["url"], rank=0, share=ReplayShare(spec["share"]), **new_args)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    new.load_state_dict(state)
    seconds = time.perf_counter() - started
    return {
        "from_world_size": spec["loader"]["world_size"],
        "to_world_size": spec["new_world_size"],
        "batches_consumed": state["batches"],
        "load_state_s": round(seconds, 3),
        "rss_growth_mb": round(peak_rss_mb() - baseline, 1),
    }


def in_fresh_process(mode: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run(
            [sys.executable, __file__, f"--{mode}", f.name],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {spec.get('rank', '')} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


# -- exactly once over all streams ----------------------------------------------------------------


def check_epoch(planner: Planner, layout: Layout, epoch: int = 0) -> dict:
    """Every stream's plan of ``epoch`` (as its worker builds it): each planned sequence emitted
    exactly once; and each sample's read count over the whole epoch."""
    started = time.perf_counter()
    view = PlanView(planner, layout)
    emitted = np.zeros(len(planner.counts), dtype=np.int64)  # groups per shard, all streams
    dealt = np.zeros(len(planner.counts), dtype=np.int64)  # streams each shard was dealt to
    bad_rounds = 0
    for stream in range(layout.num_streams):
        for rnd in view.rounds(epoch, stream):
            sizes = np.array([s.stop - s.start for s in rnd.slots])
            bad_rounds += not np.array_equal(np.bincount(rnd.order, minlength=len(sizes)), sizes)
            for slot, size in zip(rnd.slots, sizes.tolist()):
                bad_rounds += slot.start != 0  # a fresh epoch starts every shard at group 0
                emitted[slot.shard] += size
                dealt[slot.shard] += 1
    plans_s = time.perf_counter() - started
    n = planner.config.seq_len
    reads = Counter()
    for shard in np.flatnonzero(planner.groups_per_shard).tolist():
        planned = int(planner.groups_per_shard[shard])
        members = planner.groups(shard, epoch).members[:planned]  # the rows the streams emit
        reads["rows_missing"] += planned - len(members)
        per_sample = np.bincount(members.ravel(), minlength=int(planner.counts[shard]))
        reads["once"] += int((per_sample == 1).sum())
        reads["more"] += int((per_sample > 1).sum())
        reads["never"] += int((per_sample == 0).sum())
        rows_distinct = (np.diff(np.sort(members, axis=1), axis=1) > 0).all()
        reads["sequences_with_repeats"] += int(not rows_distinct)
    result = {
        "streams": layout.num_streams,
        "sequences_planned": planner.sequences_per_epoch,
        "sequences_emitted": int(emitted.sum()),
        "sequences_emitted_twice_or_lost": int(np.abs(emitted - planner.groups_per_shard).sum()),
        "shards_dealt_twice": int((dealt > 1).sum()),
        "inconsistent_rounds": int(bad_rounds),
        "samples_read_once": reads["once"],
        "samples_read_more_than_once": reads["more"],
        "samples_not_read": reads["never"],
        "sequences_with_a_repeated_image": reads["sequences_with_repeats"],
        "sequences_without_samples": reads["rows_missing"],
        "all_stream_plans_s": round(plans_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    groups_once = (
        result["sequences_emitted_twice_or_lost"] == 0
        and result["shards_dealt_twice"] == 0
        and result["inconsistent_rounds"] == 0
        and result["sequences_with_a_repeated_image"] == 0
        and result["sequences_without_samples"] == 0
    )
    if planner.config.class_sampling == "proportional":
        left_out = int((planner.counts[planner.usable] % n).sum())  # fewer than n per shard
        result["samples_left_out_by_design"] = left_out
        result["exactly_once"] = bool(
            groups_once and reads["more"] == 0 and reads["never"] == left_out
        )
    else:
        result["exactly_once"] = groups_once  # per sequence; samples recur by design
    return result


# -- the benchmark --------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced size, for tests")
    p.add_argument("--classes", type=int, help="default: 21841 (quick: 60)")
    p.add_argument("--samples", type=int, help="default: 14197122 (quick: 12000)")
    p.add_argument(
        "--shard-size",
        type=int,
        help="bytes, as make_shards --shard-size; default 256 MiB (quick: 8 MiB)",
    )
    p.add_argument("--world-size", type=int, help="ranks; default 1024 (quick: 4)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank; default 8 (quick: 2)")
    p.add_argument("--batch-size", type=int, help="per rank; default 32 (quick: 8)")
    p.add_argument("--seq-len", type=int, default=5, help="as data.seq_len")
    p.add_argument("--class-sampling", default="uniform", choices=SAMPLINGS, help="of the ranks")
    p.add_argument("--open-shards", type=int, default=8, help="SequenceLoader's open_shards")
    p.add_argument("--window", type=int, default=128, help="SequenceLoader's window")
    p.add_argument(
        "--ranks", type=int, nargs="+", help="ranks to measure; default 0 1 W/2 W-1 (quick: 0 W-1)"
    )
    p.add_argument("--worker-samples", type=int, nargs="+", help="default: 0 and V-1")
    p.add_argument("--seed", type=int, default=0, help="of the class sizes and of the plan")
    p.add_argument("--measure-rank", help=argparse.SUPPRESS)
    p.add_argument("--measure-resize", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    w = args.world_size
    args.ranks = sorted(set(args.ranks or ([0, w - 1] if args.quick else [0, 1, w // 2, w - 1])))
    if args.ranks[0] != 0:
        args.ranks = [0, *args.ranks]  # rank 0 first: the others receive what it read
    args.worker_samples = sorted(set(args.worker_samples or [0, max(args.workers, 1) - 1]))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    for mode in ("measure_rank", "measure_resize"):
        if getattr(args, mode):
            spec = json.loads(Path(getattr(args, mode)).read_text())
            print(json.dumps((measure_rank if mode == "measure_rank" else measure_resize)(spec)))
            return {}

    started = time.perf_counter()
    sizes = class_sizes(args.classes, args.samples, args.seed)
    paths, classes, counts, per_shard = shard_layout(sizes, args.shard_size)
    layout = Layout(args.world_size, max(args.workers, 1), args.batch_size, args.open_shards)

    def planner(sampling: str) -> Planner:
        config = PlanConfig(args.seq_len, sampling, args.seed, args.window)
        return Planner(counts, classes, [True] * len(counts), config)

    # the shards the measured ranks' workers read for their first batches (and what they prefetch)
    streams = [
        r * layout.streams_per_rank + w for r in args.ranks for w in range(layout.streams_per_rank)
    ]
    needed = max(layout.micro_batch(s) for s in streams) * (2 + 2)  # prefetch 2, and one more
    real = first_batch_shards(PlanView(planner(args.class_sampling), layout), streams, needed)

    with (
        tempfile.TemporaryDirectory() as tmp,
        open(Path(tmp) / "s3.log", "wb") as log,
        moto_endpoint(log) as endpoint,
    ):
        text = write_shard_set(endpoint, sizes, paths, classes, counts, real, args.seed)
        setup_s = time.perf_counter() - started
        spec = dict(
            url=ROOT,
            loader=dict(
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                world_size=args.world_size,
                num_workers=args.workers,
                class_sampling=args.class_sampling,
                open_shards=args.open_shards,
                window=args.window,
                seed=args.seed,
                storage_options={"client_kwargs": {"endpoint_url": endpoint}},
            ),
            log=log.name,
            share=str(Path(tmp) / "share.pickle"),
            worker_samples=args.worker_samples,
        )
        ranks = [in_fresh_process("measure-rank", {**spec, "rank": r}) for r in args.ranks]
        resize = in_fresh_process(
            "measure-resize", {**spec, "new_world_size": max(1, args.world_size - 8)}
        )
    once = {sampling: check_epoch(planner(sampling), layout) for sampling in SAMPLINGS}

    workers = [w for r in ranks for w in r["workers"]]
    report = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("measure")},
        "dataset": {
            "shards": len(paths),
            "samples_per_shard_max": per_shard,
            "objects_listed": 2 * len(paths),  # shards and their sidecars
            "manifest_mb": round(len(text) / 2**20, 2),
            "shards_with_real_samples": len(real),
            "setup_s": round(setup_s, 1),
        },
        "ranks": ranks,
        "resize": resize,
        "exactly_once": once,
        "summary": {
            "max_parse_plus_plan_s": max(r["parse_plus_plan_s"] for r in ranks),
            "max_rss_growth_mb": max(r["rss_growth_mb"] for r in ranks),
            "requests_at_startup_rank0": ranks[0]["requests_at_startup"],
            "max_requests_at_startup_other_ranks": max(
                (r["requests_at_startup"] for r in ranks[1:]), default=None
            ),
            "max_requests_to_first_batch": max(r["requests_to_first_batch"] for r in ranks),
            "max_worker_plan_s": max(w["plan_s"] for w in workers),
            "max_worker_uss_growth_mb": max(w["uss_growth_mb"] for w in workers),
            "exactly_once": all(c["exactly_once"] for c in once.values()),
            "targets": TARGETS,
        },
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

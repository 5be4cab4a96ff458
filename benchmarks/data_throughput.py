"""Data pipeline throughput: raw tar-member rate vs full SequenceLoader rate, local and S3, and
the loader through cloud-like object storage (latency, throttling, resets).

    python benchmarks/data_throughput.py                      # the default matrix, JSON on stdout
    python benchmarks/data_throughput.py --latency-ms 25 --jitter-ms 5 --slowdown 0.01 --reset 0.001
    python benchmarks/data_throughput.py --shards s3://bucket/set --endpoint-url URL --workers 8

Without --shards it writes three shard sets into a temporary directory: scikit-learn's digits
(32x32 pixels, 3 KiB per image) in 1 MiB shards and in make_shards' default layout (256 MB
shards: one per class), and synthetic SD-VAE moments of 256-px images (2 x 8 x 32 x 32 float32,
64 KiB per image: what ARFlow-XL/2 trains on) in 52 MB shards; copies each to a moto_server it
starts on a free loopback port, and measures every (payload, storage, workers) combination.

Per case: ``raw`` is the rate of iterating the tar members of every shard (read + tar parsing, no
decoding) with webdataset's member iterator (Python's tarfile underneath), with the same number of
processes as loader workers; ``raw_own_reader`` is the same with the loader's own member reader
(arflow.data.shards.tar_members, which parses the headers make_shards writes several times faster
than tarfile); ``pipeline`` is SequenceLoader's rate (read, decode, flip / latent sampling,
assemble, collate) after one warm-up batch. ``ratio`` = pipeline images/s / raw samples/s (the
target: >= 0.8), ``ratio_to_own_reader`` the same against raw_own_reader, ``over_no_workers``
the pipeline rate over the same case's rate with 0 workers (the target: >= 1).
``images_per_s_per_core`` divides by the number of processes doing the work (max(workers, 1)).
Each rate is the best of ``--repeats`` runs. ``invalid_sequences`` counts emitted sequences that
are not n distinct samples of one class (must be 0).

Cloud storage (any of --latency-ms, --bandwidth-mb-s, --slowdown, --reset): the latent set on
S3 is read through tests/s3_faults.py, an HTTP proxy in front of moto that adds first-byte
latency with jitter, caps bandwidth, answers 503 SlowDown (with Retry-After) and resets
connections at the given rates. Reported per worker count: the pipeline's images/s per rank with
and without the proxy (``over_no_latency``: the target >= 0.8), the proxy's counters, and one
epoch read with proportional sampling checked sample by sample (``epoch``: sequences expected
and emitted, samples read twice, samples lost; all must be 0 but the first two, which must
agree), then a restored loader's next batches compared with the uninterrupted ones
(``exact_resume``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from arflow.data import SequenceLoader, load_manifest
from arflow.data.shards import tar_members
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder
from arflow.data.writing.sources import DigitsSource
from arflow.data.writing.synthetic import write_synthetic_latents
from arflow.storage import RetryingReader

# The fault-injecting S3 proxy lives in the test tree (tests/s3_faults.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from s3_faults import Faults, fault_proxy  # noqa: E402


def _iterate_members(job) -> tuple[int, int, float]:
    """Iterate the tar members of ``urls`` round and round for ``seconds``; (members, bytes, seconds)."""
    from webdataset.tariterators import tar_file_iterator

    urls, options, seconds, parser = job
    # Warm-up, as the pipeline's first batch: a process's first S3 client takes about a second.
    RetryingReader(urls[0], options).close()
    members = nbytes = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for url in urls:
            reader = RetryingReader(url, options)
            for _member in (
                tar_file_iterator(reader) if parser == "webdataset" else tar_members(reader)
            ):
                members += 1
            nbytes += reader.position
            reader.close()
    return members, nbytes, time.perf_counter() - started


def raw_rate(url: str, options, processes: int, seconds: float, parser: str = "webdataset") -> dict:
    """Tar members read per second by ``processes`` processes, each over its share of the shards.

    parser: "webdataset" (its tar member iterator over Python's tarfile: the reference rate) or
    "arflow" (arflow.data.shards.tar_members, the loader's own member reader).
    """
    urls = [s.url for s in load_manifest(url, options).shards]
    jobs = [(urls[i::processes], options, seconds, parser) for i in range(processes)]
    if processes == 1:
        results = [_iterate_members(jobs[0])]
    else:
        with ProcessPoolExecutor(processes) as pool:
            results = list(pool.map(_iterate_members, jobs))
    samples = sum(m / t for m, _, t in results) / 2  # two members (.cls, .npy) per sample
    return {"samples_per_s": samples, "MB_per_s": sum(b / t for _, b, t in results) / 1e6}


def proportional_loader(
    url: str, options, workers: int, seq_len: int, batch_size: int
) -> SequenceLoader:
    """Proportional sampling: every stored sample in at most one sequence per epoch."""
    return SequenceLoader(
        url,
        seq_len=seq_len,
        batch_size=batch_size,
        num_workers=workers,
        storage_options=options,
        class_sampling="proportional",
        return_meta=True,
    )


def pipeline_rate(
    url: str, options, workers: int, seq_len: int, batch_size: int, batches: int
) -> dict:
    loader = proportional_loader(url, options, workers, seq_len, batch_size)
    manifest = loader.manifest
    offsets = np.cumsum([s.count for s in manifest.shards])
    shard_class = np.array([s.class_id for s in manifest.shards])
    bytes_per_image = sum(s.bytes for s in manifest.shards) / sum(s.count for s in manifest.shards)
    it = iter(loader)
    next(it)  # worker start-up and first shard opens are not throughput
    invalid = sequences = 0
    started = time.perf_counter()
    for _ in range(batches):
        _, y, meta = next(it)
        ids = meta["sample_ids"].numpy()
        classes = shard_class[np.searchsorted(offsets, ids, side="right")]
        distinct = np.array([len(set(row)) == seq_len for row in ids])
        same_class = (classes == y.numpy()[:, None]).all(axis=1)
        invalid += int((~(distinct & same_class)).sum())
        sequences += len(ids)
    seconds = time.perf_counter() - started
    del it
    images = sequences * seq_len / seconds
    return {
        "sequences_per_s": sequences / seconds,
        "images_per_s": images,
        "MB_per_s": images * bytes_per_image / 1e6,
        "invalid_sequences": invalid,
        "sequences_checked": sequences,
    }


@contextlib.contextmanager
def moto_endpoint(log=subprocess.DEVNULL):
    """moto's S3 server on a free loopback port (a separate process, so it does not share our GIL),
    with a bucket "bench"; ``log`` (a file) receives its output: one line per request."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
        yield url
    finally:
        proc.terminate()
        proc.wait()


def measure(name: str, url: str, options, workers: list[int], args) -> list[dict]:
    """Best of ``args.repeats`` runs of each rate: on a shared machine the best run is the least disturbed."""
    out = []
    for k in workers:
        raws = [raw_rate(url, options, max(k, 1), args.raw_seconds) for _ in range(args.repeats)]
        readers = [
            raw_rate(url, options, max(k, 1), args.raw_seconds, "arflow")
            for _ in range(args.repeats)
        ]
        pipes = [
            pipeline_rate(url, options, k, args.seq_len, args.batch_size, args.batches)
            for _ in range(args.repeats)
        ]
        case = {
            "case": name,
            "workers": k,
            "raw": max(raws, key=lambda r: r["samples_per_s"]),
            "raw_own_reader": max(readers, key=lambda r: r["samples_per_s"]),
            "pipeline": max(pipes, key=lambda r: r["images_per_s"]),
        }
        case["pipeline"]["invalid_sequences"] = sum(p["invalid_sequences"] for p in pipes)
        case["pipeline"]["sequences_checked"] = sum(p["sequences_checked"] for p in pipes)
        case["ratio"] = case["pipeline"]["images_per_s"] / case["raw"]["samples_per_s"]
        case["ratio_to_own_reader"] = (
            case["pipeline"]["images_per_s"] / case["raw_own_reader"]["samples_per_s"]
        )
        case["images_per_s_per_core"] = case["pipeline"]["images_per_s"] / max(k, 1)
        if out and out[0]["workers"] == 0:
            case["over_no_workers"] = (
                case["pipeline"]["images_per_s"] / out[0]["pipeline"]["images_per_s"]
            )
        print(json.dumps(case), file=sys.stderr)
        out.append(case)
    return out


def epoch_check(url: str, options, workers: int, seq_len: int, batch_size: int) -> dict:
    """One epoch (proportional sampling: every stored sample in at most one sequence) read
    sample by sample, then exact resume: a loader restored after 3 batches against the
    uninterrupted loader's next 5."""

    def loader() -> SequenceLoader:
        return proportional_loader(url, options, workers, seq_len, batch_size)

    first = loader()
    it = iter(first)
    seen: collections.Counter = collections.Counter()
    emitted = 0
    for _ in range(4 * first.epoch_length + 4):  # until every stream has moved on to epoch 1
        _, _, meta = next(it)
        rows = meta["epoch"].numpy() == 0
        if not rows.any():
            break
        emitted += int(rows.sum())
        seen.update(meta["sample_ids"].numpy()[rows].ravel().tolist())
    expected = first.sequences_per_epoch
    first.close()

    original = loader()
    it = iter(original)
    for _ in range(3):
        next(it)
    state = original.state_dict()
    reference = [next(it) for _ in range(5)]
    original.close()
    restored = loader()
    restored.load_state_dict(state)
    it = iter(restored)
    again = [next(it) for _ in range(5)]
    restored.close()
    exact = all(
        torch.equal(a[0], b[0])
        and torch.equal(a[1], b[1])
        and torch.equal(a[2]["sample_ids"], b[2]["sample_ids"])
        for a, b in zip(reference, again)
    )
    return {
        "sequences_expected": expected,
        "sequences_emitted": emitted,
        "samples_read_twice": sum(1 for c in seen.values() if c > 1),
        "samples_lost": expected * seq_len - len(seen),
        "bad_samples": first.bad_samples,
        "exact_resume": exact,
    }


def cloud(url: str, direct: dict, faults: Faults, workers: list[int], args) -> list[dict]:
    """The loader on ``url`` through the fault proxy against the same store read directly.

    Rates: ``no_latency`` (moto directly), ``latency`` (through a proxy adding only the latency,
    jitter and bandwidth cap) and ``with_faults`` (the same plus the 503s and resets); the epoch
    and resume check runs with all the faults."""
    calm = dataclasses.replace(faults, slowdown=0.0, reset=0.0)
    out = []
    with (
        fault_proxy(direct["client_kwargs"]["endpoint_url"], calm) as slow,
        fault_proxy(direct["client_kwargs"]["endpoint_url"], faults) as faulty,
    ):
        routes = {
            "no_latency": direct,
            "latency": {"client_kwargs": {"endpoint_url": slow.url}},
            "with_faults": {"client_kwargs": {"endpoint_url": faulty.url}},
        }
        for k in workers:
            rates = {}
            for name, options in routes.items():
                runs = [
                    pipeline_rate(url, options, k, args.seq_len, args.batch_size, args.batches)
                    for _ in range(args.repeats)
                ]
                rates[name] = max(r["images_per_s"] for r in runs)
                if sum(r["invalid_sequences"] for r in runs):
                    raise AssertionError(
                        f"{name}, {k} workers: sequences that are not n samples of one class"
                    )
            before = faulty.stats()
            epoch = epoch_check(url, routes["with_faults"], k, args.seq_len, args.batch_size)
            after = faulty.stats()
            case = {
                "case": "latents256/s3 through the fault proxy",
                "workers": k,
                "images_per_s_per_rank": rates,
                "over_no_latency": rates["latency"] / rates["no_latency"],
                "epoch_with_faults": epoch,
                "faults_during_epoch_check": {
                    key: after[key] - before[key] for key in after if key != "methods"
                },
            }
            print(json.dumps(case), file=sys.stderr)
            out.append(case)
    return out


PAYLOADS = {
    "digits32": lambda root, opts: build_shards(
        DigitsSource(32),
        PixelEncoder(32),
        root,
        shard_size=2**20,
        storage_options=opts,
        progress=False,
    ),
    # make_shards' default size (256 MB): one shard per class
    "digits32-per-class": lambda root, opts: build_shards(
        DigitsSource(32), PixelEncoder(32), root, storage_options=opts, progress=False
    ),
    "latents256": lambda root, opts: write_synthetic_latents(
        root, classes=4, per_class=1600, per_shard=800, storage_options=opts
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", help="an existing shard set (local path or URL); default: generate the matrix"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// --shards")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure"
    )
    parser.add_argument(
        "--payloads",
        nargs="+",
        choices=sorted(PAYLOADS),
        default=list(PAYLOADS),
        help="shard sets of the matrix",
    )
    parser.add_argument("--seq-len", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batches", type=int, default=60, help="batches timed per case (after one warm-up)"
    )
    parser.add_argument(
        "--raw-seconds", type=float, default=2.0, help="duration of each raw member-rate run"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per rate; the best is reported"
    )
    cloud_args = parser.add_argument_group("cloud storage (the latent set through the fault proxy)")
    cloud_args.add_argument("--latency-ms", type=float, default=0.0, help="first-byte latency")
    cloud_args.add_argument("--jitter-ms", type=float, default=0.0, help="+- uniform jitter")
    cloud_args.add_argument(
        "--bandwidth-mb-s", type=float, default=0.0, help="per answer (0: none)"
    )
    cloud_args.add_argument("--slowdown", type=float, default=0.0, help="share of 503 SlowDown")
    cloud_args.add_argument("--retry-after", type=int, default=1, help="503s' Retry-After, s")
    cloud_args.add_argument("--reset", type=float, default=0.0, help="share of connection resets")
    args = parser.parse_args()
    faults = Faults(**{k: getattr(args, k) for k in vars(Faults()) if k != "seed"})

    results = []
    if args.shards:
        options = (
            {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
        )
        results += measure(args.shards, args.shards, options, args.workers, args)
    elif faults != Faults():
        with tempfile.TemporaryDirectory(), moto_endpoint() as endpoint:
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            PAYLOADS["latents256"]("s3://bench/latents256", options)
            results += cloud("s3://bench/latents256", options, faults, args.workers, args)
    else:
        with tempfile.TemporaryDirectory() as tmp, moto_endpoint() as endpoint:
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            for payload in args.payloads:
                for storage, root, opts in (
                    ("local", os.path.join(tmp, payload), None),
                    ("s3", f"s3://bench/{payload}", options),
                ):
                    PAYLOADS[payload](root, opts)
                    results += measure(f"{payload}/{storage}", root, opts, args.workers, args)
    print(
        json.dumps(
            {
                "cpu_count": os.cpu_count(),
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "faults": vars(faults) if faults != Faults() else None,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""Data pipeline throughput: raw tar-member rate vs full SequenceLoader rate, local and S3.

    python benchmarks/data_throughput.py                      # the default matrix, JSON on stdout
    python benchmarks/data_throughput.py --shards s3://bucket/set --endpoint-url URL --workers 8

Without --shards it writes two shard sets into a temporary directory: scikit-learn's digits
(32x32 pixels, 3 KiB per image) and synthetic SD-VAE moments of 256-px images (2 x 8 x 32 x 32 float32,
64 KiB per image: what ARFlow-XL/2 trains on), copies both to a moto_server it starts on a free
loopback port, and measures every (payload, storage, workers) combination.

Per case: ``raw`` is the rate of iterating the tar members of every shard (read + tar parsing, no
decoding) with webdataset's member iterator (Python's tarfile underneath), with the same number of
processes as loader workers; ``raw_own_reader`` is the same with the loader's own member reader
(arflow.data.shards.tar_members, which parses the headers make_shards writes several times faster
than tarfile); ``pipeline`` is SequenceLoader's rate (read, decode, flip / latent sampling,
assemble, collate) after one warm-up batch. ``ratio`` = pipeline images/s / raw samples/s (the
target: >= 0.8), ``ratio_to_own_reader`` the same against raw_own_reader. ``images_per_s_per_core`` divides by the number of processes
doing the work (max(workers, 1)). Each rate is the best of ``--repeats`` runs. ``invalid_sequences`` counts emitted sequences that are not n
distinct samples of one class (must be 0).
"""

from __future__ import annotations

import argparse
import contextlib
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

from arflow.data import SequenceLoader, load_manifest
from arflow.data.shards import tar_members
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder
from arflow.data.writing.sources import DigitsSource
from arflow.data.writing.synthetic import write_synthetic_latents
from arflow.storage import RetryingReader


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


def pipeline_rate(
    url: str, options, workers: int, seq_len: int, batch_size: int, batches: int
) -> dict:
    loader = SequenceLoader(
        url,
        seq_len=seq_len,
        batch_size=batch_size,
        num_workers=workers,
        storage_options=options,
        class_sampling="proportional",
        return_meta=True,
    )
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
        print(json.dumps(case), file=sys.stderr)
        out.append(case)
    return out


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
    args = parser.parse_args()

    results = []
    if args.shards:
        options = (
            {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
        )
        results += measure(args.shards, args.shards, options, args.workers, args)
    else:
        with tempfile.TemporaryDirectory() as tmp, moto_endpoint() as endpoint:
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            for payload in ("digits32", "latents256"):
                for storage, root, opts in (
                    ("local", os.path.join(tmp, payload), None),
                    ("s3", f"s3://bench/{payload}", options),
                ):
                    if payload == "digits32":
                        build_shards(
                            DigitsSource(32),
                            PixelEncoder(32),
                            root,
                            shard_size=2**20,
                            storage_options=opts,
                            progress=False,
                        )
                    else:
                        write_synthetic_latents(
                            root, classes=4, per_class=400, per_shard=200, storage_options=opts
                        )
                    results += measure(f"{payload}/{storage}", root, opts, args.workers, args)
    print(
        json.dumps(
            {
                "cpu_count": os.cpu_count(),
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

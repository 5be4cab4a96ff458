"""Streaming through a real S3 endpoint (moto_server), with network faults injected by a TCP proxy
(connections refused or cut) and by tests/s3_faults.py's HTTP proxy (latency, bandwidth, 503
SlowDown, resets)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from s3_faults import Faults, fault_proxy

from arflow.data import BadSampleWarning, RetryPolicy, SequenceLoader, ShardError, load_manifest
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder
from arflow.data.writing.sources import DigitsSource
from arflow.storage import RetryingReader, read_bytes
from arflow.storage.files import READ_AHEAD_CHUNK


class FaultyProxy:
    """A TCP proxy to ``upstream`` that refuses connections for its first ``closed_for`` seconds and
    cuts each of its first ``cut`` connections after relaying ``cut_after`` bytes of response.
    ``requests`` counts the HTTP requests relayed."""

    def __init__(self, upstream: str, *, closed_for: float = 0.0, cut: int = 0, cut_after: int = 0):
        host, port = upstream.rsplit("/", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.cut, self.cut_after, self.cuts, self.connections = cut, cut_after, 0, 0
        self.requests = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.opens_at = time.monotonic() + closed_for
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        time.sleep(max(0.0, self.opens_at - time.monotonic()))
        self.listener.listen(64)
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            doomed = self.connections < self.cut
            self.connections += 1
            threading.Thread(
                target=self._pump, args=(client, server, None, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump,
                args=(server, client, self.cut_after if doomed else None),
                daemon=True,
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, limit: int | None, upstream=False
    ) -> None:
        relayed = 0
        try:
            while data := source.recv(65536):
                if upstream:
                    self.requests += data.count(b" HTTP/1.1\r\n")  # request lines
                if limit is not None and relayed + len(data) > limit:
                    sink.sendall(data[: limit - relayed])
                    self.cuts += 1
                    break
                sink.sendall(data)
                relayed += len(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def s3_digits(moto_s3):
    url = f"s3://{moto_s3.bucket()}/digits"
    build_shards(
        DigitsSource(8),
        PixelEncoder(8),
        url,
        shard_size=64_000,
        storage_options=moto_s3.storage_options,
        progress=False,
    )
    return url


def batches(url, count, **kwargs):
    it = iter(SequenceLoader(url, seq_len=5, batch_size=4, seed=3, **kwargs))
    return [next(it) for _ in range(count)]


def test_s3_and_local_copies_stream_identical_batches(s3_digits, digits_shards, moto_s3):
    assert (
        load_manifest(s3_digits, moto_s3.storage_options).to_dict()["shards"]
        == load_manifest(digits_shards).to_dict()["shards"]
    )
    remote = batches(s3_digits, 30, num_workers=2, storage_options=moto_s3.storage_options)
    local = batches(digits_shards, 30, num_workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(remote, local))


def test_endpoint_that_comes_up_late_is_retried_with_backoff(s3_digits, moto_s3, caplog):
    proxy = FaultyProxy(moto_s3.url, closed_for=1.0)
    try:
        options = {"client_kwargs": {"endpoint_url": proxy.url}}
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="arflow.storage"):
            manifest = load_manifest(
                s3_digits, options, retry=RetryPolicy(attempts=8, base_delay=0.1)
            )
        assert time.monotonic() - started >= 1.0 and manifest.num_classes == 10
        assert f"{s3_digits}/manifest.json: transient" in caplog.text
    finally:
        proxy.close()


def test_connections_cut_mid_transfer_are_resumed(s3_digits, moto_s3, caplog):
    proxy = FaultyProxy(moto_s3.url, cut=8, cut_after=3000)
    try:
        options = {"client_kwargs": {"endpoint_url": proxy.url}}
        with caplog.at_level(logging.WARNING, logger="arflow.storage"):
            faulty = batches(
                s3_digits,
                20,
                num_workers=0,
                storage_options=options,
                retry=RetryPolicy(attempts=8, base_delay=0.05),
            )
        assert proxy.cuts >= 3  # some doomed connections only carried short answers
        assert (
            "transient ClientPayloadError" in caplog.text
        )  # resumed by RetryPolicy (s3fs retries too)
        direct = batches(s3_digits, 20, num_workers=0, storage_options=moto_s3.storage_options)
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(faulty, direct)
        )
    finally:
        proxy.close()


def test_missing_shards_on_s3_are_named_from_one_listing(digits_shards, moto_s3):
    bucket = moto_s3.bucket()
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    for path in sorted(Path(digits_shards).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/digits/{path.relative_to(digits_shards)}")
    url = f"s3://{bucket}/digits"
    shards = load_manifest(url, moto_s3.storage_options).shards
    gone = [shards[7].url, shards[51].url]
    fs.rm([u.removeprefix("s3://") for u in gone])
    proxy = FaultyProxy(moto_s3.url)
    try:
        options = {"client_kwargs": {"endpoint_url": proxy.url}}
        with pytest.raises(
            ShardError, match=f"2 of the 65 shards .* do not exist: {gone[0]}, {gone[1]}"
        ):
            SequenceLoader(url, seq_len=5, batch_size=4, num_workers=0, storage_options=options)
        assert proxy.requests <= 3  # the manifest and one listing, not one request per shard
    finally:
        proxy.close()


# -- object storage as in the cloud: tests/s3_faults.py's HTTP proxy in front of moto ---------


def proxied(proxy) -> dict:
    return {"client_kwargs": {"endpoint_url": proxy.url}}


def test_fault_proxy_adds_latency_and_caps_bandwidth(s3_digits, moto_s3):
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    blob = os.urandom(600_000)
    fs.pipe_file(f"{s3_digits.removeprefix('s3://')}/blob", blob)
    with fault_proxy(moto_s3.url, Faults(latency_ms=200, bandwidth_mb_s=1.0)) as proxy:
        started = time.monotonic()
        assert read_bytes(f"{s3_digits}/manifest.json", proxied(proxy))
        small = time.monotonic() - started
        started = time.monotonic()
        assert read_bytes(f"{s3_digits}/blob", proxied(proxy)) == blob
        large = time.monotonic() - started
        assert proxy.stats()["requests"] >= 2
    assert small >= 0.2 and large >= 0.2 + 0.6  # latency, then 600 KB at 1 MB/s


def test_slowdown_waits_as_long_as_retry_after_asks(s3_digits, moto_s3, caplog):
    # Every request the proxy may fail is answered 503 SlowDown (Retry-After: 1); a retry of a
    # request that just failed goes through.
    with fault_proxy(moto_s3.url, Faults(slowdown=1.0, retry_after=1)) as proxy:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="arflow.storage"):
            manifest = load_manifest(
                s3_digits, proxied(proxy), retry=RetryPolicy(base_delay=0.01, max_delay=5)
            )
        slowdowns = proxy.stats()["slowdowns"]
    assert manifest.num_classes == 10 and slowdowns >= 1
    waits = [
        r.getMessage()
        for r in caplog.records
        if "manifest.json: transient OSError" in r.getMessage()
    ]
    assert len(waits) == slowdowns and all(w.endswith(" in 1.00 s") for w in waits), waits
    assert time.monotonic() - started >= slowdowns


def test_read_ahead_delivers_the_object_and_raises_errors_where_they_happen(moto_s3):
    bucket = moto_s3.bucket()
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    blob = os.urandom(9 * 2**20 + 12_345)  # several read-ahead chunks and a short last one
    fs.pipe_file(f"{bucket}/blob", blob)
    url = f"s3://{bucket}/blob"
    with fault_proxy(moto_s3.url, Faults(reset=0.5, seed=3)) as proxy:
        reader = RetryingReader(
            url,
            proxied(proxy),
            RetryPolicy(base_delay=0.01),
            size=len(blob),
            read_ahead=2 * READ_AHEAD_CHUNK,
        )
        parts = []
        for size in itertools.cycle([1, 777_777, 3 * 2**20]):
            if not (data := reader.read(size)):
                break
            parts.append(data)
        reader.close()
        stats = proxy.stats()
    # the size came from the caller: GETs only, no HEAD before them
    assert stats["resets"] + stats["resets_mid_body"] > 0 and set(stats["methods"]) == {"GET"}
    assert b"".join(parts) == blob and reader.position == len(blob)
    assert reader.sha256.hexdigest() == hashlib.sha256(blob).hexdigest()

    gone = RetryingReader(f"s3://{bucket}/missing", moto_s3.storage_options, size=10, read_ahead=1)
    with pytest.raises(FileNotFoundError):
        gone.read(5)
    gone.close()

    threads = threading.active_count()
    stopped = RetryingReader(url, moto_s3.storage_options, read_ahead=READ_AHEAD_CHUNK)
    assert stopped.read(100) == blob[:100]
    stopped.close()  # the download thread stops instead of reading the rest
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads


def epoch_zero(batches) -> tuple[int, collections.Counter]:
    """Sequences of epoch 0 among ``batches`` and how often each sample id occurs in them."""
    sequences, seen = 0, collections.Counter()
    for _, _, meta in batches:
        rows = meta["epoch"].numpy() == 0
        sequences += int(rows.sum())
        seen.update(meta["sample_ids"].numpy()[rows].ravel().tolist())
    return sequences, seen


def test_throttling_and_resets_lose_and_duplicate_nothing_and_resume_exactly(s3_digits, moto_s3):
    kwargs = dict(
        seq_len=5,
        batch_size=8,
        num_workers=2,
        seed=5,
        class_sampling="proportional",
        return_meta=True,
        retry=RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.1),
    )
    direct = SequenceLoader(s3_digits, storage_options=moto_s3.storage_options, **kwargs)
    count = direct.epoch_length + 4  # every stream has moved on to epoch 1 by then
    it = iter(direct)
    expected = [next(it) for _ in range(count)]
    direct.close()

    # 15% of the requests throttled, 10% reset (before the answer or half-way through its body)
    with fault_proxy(moto_s3.url, Faults(slowdown=0.15, reset=0.1, retry_after=0, seed=7)) as proxy:
        faulty = SequenceLoader(s3_digits, storage_options=proxied(proxy), **kwargs)
        it = iter(faulty)
        got = [next(it) for _ in range(count)]
        sequences, seen = epoch_zero(got)
        assert sequences == faulty.sequences_per_epoch  # every sequence of the epoch, once
        assert len(seen) == 5 * sequences and max(seen.values()) == 1
        assert faulty.bad_samples == 0
        assert all(same_batch(a, b) for a, b in zip(got, expected))

        state = faulty.state_dict()  # after `count` batches
        faulty.close()
        restored = SequenceLoader(s3_digits, storage_options=proxied(proxy), **kwargs)
        restored.load_state_dict(state)
        it = iter(restored)
        resumed = [next(it) for _ in range(6)]
        restored.close()
        stats = proxy.stats()
    assert stats["slowdowns"] > 0 and stats["resets"] + stats["resets_mid_body"] > 0, stats

    direct = SequenceLoader(s3_digits, storage_options=moto_s3.storage_options, **kwargs)
    it = iter(direct)
    uninterrupted = [next(it) for _ in range(count + 6)][count:]
    direct.close()
    assert all(same_batch(a, b) for a, b in zip(resumed, uninterrupted))


def same_batch(a, b) -> bool:
    return (
        torch.equal(a[0], b[0])
        and torch.equal(a[1], b[1])
        and torch.equal(a[2]["sample_ids"], b[2]["sample_ids"])
    )


def test_a_shard_deleted_from_s3_after_the_start_is_named(s3_digits, moto_s3):
    bucket = moto_s3.bucket()
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    fs.copy(s3_digits.removeprefix("s3://"), f"{bucket}/digits", recursive=True)
    url = f"s3://{bucket}/digits"
    loader = SequenceLoader(
        url, seq_len=5, batch_size=4, num_workers=0, storage_options=moto_s3.storage_options
    )
    fs.rm([s.url.removeprefix("s3://") for s in loader.manifest.shards])
    with pytest.raises(
        ShardError, match=r"shard s3://.*\.tar listed in the manifest does not exist"
    ):
        next(iter(loader))


def test_a_shard_truncated_on_s3_loses_its_tail_samples_not_the_run(s3_digits, moto_s3):
    # The manifest's size is used instead of a HEAD request: an object shorter than that must end
    # the shard early (bad samples, counted), not look like a storage outage.
    bucket = moto_s3.bucket()
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    fs.copy(s3_digits.removeprefix("s3://"), f"{bucket}/digits", recursive=True)
    url = f"s3://{bucket}/digits"
    shard = load_manifest(url, moto_s3.storage_options).shards[0]
    data = fs.cat_file(shard.url.removeprefix("s3://"))
    fs.pipe_file(shard.url.removeprefix("s3://"), data[: len(data) // 2])
    loader = SequenceLoader(
        url,
        seq_len=5,
        batch_size=4,
        num_workers=0,
        class_sampling="proportional",
        storage_options=moto_s3.storage_options,
        retry=RetryPolicy(attempts=2, base_delay=0.01),
    )
    it = iter(loader)
    started = time.monotonic()
    with pytest.warns(BadSampleWarning, match=rf"shard {shard.url}: samples #\d+\.\.#\d+ missing"):
        for _ in range(loader.epoch_length + 2):
            next(it)
    assert 0 < loader.bad_samples < shard.count and time.monotonic() - started < 30

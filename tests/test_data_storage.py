"""Streaming through a real S3 endpoint (moto_server), with network faults injected by a TCP proxy."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

from arflow.data import RetryPolicy, SequenceLoader, ShardError, load_manifest
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder
from arflow.data.writing.sources import DigitsSource


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

"""The storage layer: retries with jitter and Retry-After; object-by-object moves and deletions
that are safe to repeat, on a local directory and on a real S3 endpoint (moto's server),
including a process SIGKILLed in the middle of a move."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError
from s3_faults import Faults, fault_proxy
from s3fs.errors import translate_boto_error

from arflow.checkpoint import CheckpointRoot, step_dir_name
from arflow.checkpoint.retain import make_room, remove_incomplete
from arflow.storage import RetryPolicy, StorageError, Store
from arflow.storage.retry import retry_after


def slow_down(retry_after_value: str | None) -> OSError:
    """What s3fs raises for S3's 503 SlowDown: botocore's error, translated by s3fs itself."""
    headers = {"retry-after": retry_after_value} if retry_after_value is not None else {}
    error = ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": headers},
        },
        "GetObject",
    )
    return translate_boto_error(error)


def test_backoff_has_jitter_within_bounds_and_honours_retry_after():
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    for attempt, backoff in ((1, 0.5), (2, 1.0), (4, 4.0), (6, 8.0)):
        waits = {policy.delay(attempt) for _ in range(50)}
        assert all(backoff / 2 <= w <= backoff for w in waits)
        assert len(waits) > 40  # spread out, not one value for every rank
    err = slow_down("3")
    assert retry_after(err) == 3.0
    assert all(3.0 <= policy.delay(1, err) <= 3.0 + 1e-9 for _ in range(20))
    assert policy.delay(1, slow_down("600")) == 8.0  # capped at max_delay
    assert retry_after(slow_down(None)) is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.0 < retry_after(slow_down(http_date)) <= 5.0


def test_slow_down_is_retried_then_named():
    calls = []

    def request():
        calls.append(time.monotonic())
        raise slow_down("0.2")

    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=1.0)
    with pytest.raises(StorageError, match="s3://b/k: gave up after 3 attempts"):
        policy.call("s3://b/k", request)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) == 3 and all(g >= 0.2 for g in gaps)  # waited as the server asked


def tree(store: Store, rel: str) -> dict[str, bytes]:
    return {name: store.read(f"{rel}/{name}") for name in store.files(rel)}


FILES = {"a.bin": b"a" * 100, "zero/b.pt": b"b" * 10, "zero/c/d.pt": b"d", "meta.json": b"{}"}


def fill(store: Store, rel: str, files: dict[str, bytes] = FILES) -> None:
    for name, data in files.items():
        store.write_atomic(f"{rel}/{name}", data)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    moto = request.getfixturevalue("moto_s3")
    return Store(f"s3://{moto.bucket()}/root", moto.storage_options)


@pytest.mark.slow  # the s3 case runs against a moto server
def test_move_and_remove_tree(store):
    fill(store, "src")
    store.move_tree("src", "dst", last=["meta.json"])
    assert tree(store, "dst") == FILES
    assert not store.exists("src") and store.files("src") == []
    assert store.children() == ["dst"]
    store.move_tree("src", "dst", last=["meta.json"])  # repeating a finished move changes nothing
    assert tree(store, "dst") == FILES
    store.remove_tree("dst", first=["meta.json"])
    assert store.children() == [] and store.files("dst") == []
    assert store.sizes("nowhere") == {} and store.children("nowhere") == []


MOVER = """
import sys, time
from arflow.storage import Store

store = Store(sys.argv[1], __import__("json").loads(sys.argv[2]))
call = store._call

def slowly(rel, fn):  # this store's own requests, slowed so that a kill lands mid-way
    time.sleep(0.05)
    return call(rel, fn)

store._call = slowly
store.move_tree(sys.argv[3], sys.argv[4], last=["meta.json"])
"""


@pytest.mark.slow  # a moto server and a subprocess per case
@pytest.mark.parametrize("kill_during", ["copy", "delete"])
def test_sigkill_during_a_move_loses_nothing_and_the_move_completes(moto_s3, kill_during):
    """A checkpoint being moved aside on S3 (make_room) is SIGKILLed while objects are copied,
    or after the source's commit marker is gone: either way one complete copy survives, the
    next start and the next save finish the job, and every byte arrives."""
    url = f"s3://{moto_s3.bucket()}/ckpt"
    store = Store(url, moto_s3.storage_options)
    name = step_dir_name(30)
    files = {f"zero/part_{i:03d}.pt": os.urandom(64) for i in range(60)}
    meta = {
        "arflow_checkpoint_version": 2,
        "step": 30,
        "run_id": "old",
        "world_size": 1,
        "config": {},
        "lineage": [{"run": "old"}],
        "files": {},
    }
    fill(store, name, {**files, "meta.json": json.dumps(meta).encode()})
    aside = f"{name}.abandoned-old"
    proc = subprocess.Popen(
        [sys.executable, "-c", MOVER, url, json.dumps(moto_s3.storage_options), name, aside]
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            copied = len(store.files(aside))
            marker_gone = not store.exists(f"{name}/meta.json")
            if (kill_during == "copy" and 10 <= copied < 40) or (
                kill_during == "delete" and marker_gone
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the move never reached the {kill_during} phase")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # Never lost: a complete copy (marker and every file) exists on one side or the other.
    complete = [
        d for d in (name, aside) if store.exists(f"{d}/meta.json") and len(store.files(d)) == 61
    ]
    assert complete, "the SIGKILL left no complete copy"

    # Recovery as the trainer does it: the next start removes incomplete step directories, the
    # next save of step 30 by another lineage moves what is left aside.
    root = CheckpointRoot(url, moto_s3.storage_options)
    remove_incomplete(root)
    make_room(root, 30, [{"run": "new"}], print)
    assert not store.exists(name)
    assert tree(store, aside) == {**files, "meta.json": json.dumps(meta).encode()}


def test_an_upload_waits_for_the_answer_longer_than_a_read(moto_s3, tmp_path):
    # The proxy holds every request for 1.5 s: longer than read_timeout (a read gives up), shorter
    # than commit_timeout (an uploaded file's answer, which S3 sends once it assembled the object).
    (tmp_path / "part.bin").write_bytes(os.urandom(1000))
    retry = RetryPolicy(attempts=1, read_timeout=1.0, commit_timeout=5.0)
    with fault_proxy(moto_s3.url, Faults(latency_ms=1500)) as proxy:
        store = Store(
            f"s3://{moto_s3.bucket()}/run", {"client_kwargs": {"endpoint_url": proxy.url}}, retry
        )
        store.upload(str(tmp_path), ["part.bin"], "step")
        with pytest.raises(StorageError, match="Read timeout"):
            store.read("step/part.bin")
    direct = Store(store.url, moto_s3.storage_options)
    assert direct.read("step/part.bin") == (tmp_path / "part.bin").read_bytes()

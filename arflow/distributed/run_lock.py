"""One run per directory: an exclusive lock held by rank 0 for the whole run.

Local or shared file systems: `fcntl.flock` on `<dir>/.arflow.lock`. The kernel (or the NFS
lock manager) releases it when the holder dies, so a lock is never stale; the file's text names
the holder (run id, host, pid, start time) for the error message.

Object stores (s3://...): there is no flock, so the lock is an object written with S3's
conditional requests. Acquire = create `<dir>/.arflow.lock` only if absent (If-None-Match: *).
The holder rewrites it every `HEARTBEAT_S` seconds, each time only if it still holds the version
it wrote last (If-Match: ETag). A lock whose last heartbeat is older than `STALE_AFTER_S`, in
the store's own clock (Last-Modified against the response's Date), belonged to a dead run and
is taken over, again with If-Match, so two starters cannot both win. A holder that finds its
lock taken over (it was paused longer than STALE_AFTER_S) is marked `lost` and the trainer
stops before it writes or deletes anything more. Needs a store with conditional writes (AWS S3
since 2024, MinIO, moto); elsewhere acquiring fails with a message saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from email.utils import parsedate_to_datetime

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCK_NAME = ".arflow.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


class RunLockedError(RuntimeError):
    """Another live run holds the directory."""


def holder_info(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.time(),
    }


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (
        f"run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, since {since})"
    )


class LocalLock:
    def __init__(self, directory: str, run_id: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.run_id = run_id
        self.fd: int | None = None
        self.lost = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path) as f:
                text = f.read()
            os.close(fd)
            try:
                holder = describe(json.loads(text))
            except ValueError:
                holder = "another process"
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is in use by {holder}: two runs must not share a "
                f"run or checkpoint directory (each would prune the other's checkpoints). Stop "
                f"that run or choose another run.dir / checkpoint.dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info(self.run_id)).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _precondition_failed(err: BaseException) -> bool:
    cause = err.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or (
        isinstance(err, FileExistsError)
    )


class ObjectStoreLock:
    def __init__(self, url: str, run_id: str, storage_options: dict | None = None):
        self.fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.bucket, _, prefix = path.strip("/").partition("/")
        self.key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
        self.url = f"{url.rstrip('/')}/{LOCK_NAME}"
        self.run_id = run_id
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, **condition) -> str:
        body = json.dumps(holder_info(self.run_id)).encode()
        out = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition
        )
        return out["ETag"]

    def acquire(self) -> None:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except OSError as err:
            if not _precondition_failed(err):
                raise OSError(f"cannot create the run lock {self.url}: {err}") from err
            self._take_over_if_stale()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self) -> None:
        head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        server_now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - head["LastModified"]).total_seconds()
        holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
        if age < STALE_AFTER_S:
            raise RunLockedError(
                f"{self.url.rsplit('/', 1)[0]} is in use by {describe(holder)}, last heartbeat "
                f"{age:.0f} s ago: two runs must not share a checkpoint directory. Stop that run "
                f"or choose another checkpoint.dir (a lock without heartbeat for "
                f"{STALE_AFTER_S:.0f} s is taken over)."
            )
        try:
            self.etag = self._put(IfMatch=head["ETag"])
        except OSError as err:
            if _precondition_failed(err):
                raise RunLockedError(
                    f"{self.url}: another run took over the stale lock at the same moment"
                ) from None
            raise
        print(
            f"took over the stale run lock {self.url} of {describe(holder)} (no heartbeat for "
            f"{age:.0f} s)",
            flush=True,
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and not self.lost:
            self.beat()

    def beat(self) -> None:
        """Renew the lock if this run still holds it; mark it lost if another run took it."""
        try:
            self.etag = self._put(IfMatch=self.etag)
        except OSError as err:
            if not _precondition_failed(err):
                return  # a transient store error: retried at the next beat (4 may fail)
            self.lost = True
            print(
                f"LOST the run lock {self.url}: another run took it over (this run missed "
                f"heartbeats for {STALE_AFTER_S:.0f} s); stopping at the next checkpoint "
                f"without writing it",
                flush=True,
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self.lost:
            # Taken over meanwhile, or the store is down: then it goes stale by itself.
            with contextlib.suppress(OSError):
                self.fs.call_s3(
                    "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag
                )
            self.etag = None


class NoLock:
    """File systems without exclusive creation (fsspec's memory://, plain HTTP): nothing is
    locked; the caller is warned that keeping one run per directory is up to them."""

    lost = False

    def __init__(self, url: str):
        self.url = url

    def acquire(self) -> None:
        print(
            f"warning: {self.url} cannot be locked (no exclusive writes on this file system); "
            f"make sure no other run uses it",
            flush=True,
        )

    def release(self) -> None:
        pass


def run_lock(url: str, run_id: str, storage_options: dict | None = None):
    """The lock for a local directory, an S3 URL, or (unlockable) another fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return LocalLock(path, run_id)
    if hasattr(fs, "call_s3"):
        return ObjectStoreLock(url, run_id, storage_options)
    return NoLock(url)

"""One writer per directory: an exclusive lock, held for the life of a run (a training run's
checkpoint and run directories, a make_shards output), released when it ends.

Local or shared file systems: `fcntl.flock` on `<dir>/.arflow.lock`. The kernel (or the NFS
lock manager) releases it when the holder dies, so a lock is never stale; the file's text names
the holder (run id, host, pid, start time) for the error message.

Object stores (s3://...): there is no flock, so the lock is an object written with S3's
conditional requests. Acquire = create `<dir>/.arflow.lock` only if absent (If-None-Match: *).
The holder rewrites it every `HEARTBEAT_S` seconds, each time only if it still holds the version
it wrote last (If-Match: ETag). A lock whose last heartbeat is older than `STALE_AFTER_S`, in
the store's own clock (Last-Modified against the response's Date), belonged to a dead run and
is taken over, again with If-Match, so two starters cannot both win. A holder that finds its
lock taken over (it was paused longer than STALE_AFTER_S) is marked `lost` and stops before it
writes or deletes anything more. Every request goes through the storage retry policy; a
conditional write whose answer was lost and that is retried finds the lock holding its own
nonce and knows it won. Needs a store with conditional writes (AWS S3 since 2024, MinIO, moto).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from email.utils import parsedate_to_datetime

from arflow.storage.files import Store, is_local
from arflow.storage.retry import RetryPolicy

LOCK_NAME = ".arflow.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


class RunLockedError(RuntimeError):
    """Another live run holds the directory."""


class _LockConflict(Exception):
    """A conditional write refused: another holder's version is there (never retried)."""


def holder_info(run_id: str, what: str = "run", nonce: str = "") -> dict:
    return {
        "run_id": run_id,
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.time(),
        "nonce": nonce,
    }


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (
        f"{holder.get('what', 'run')} {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} "
        f"on host {holder.get('host', '?')}, since {since})"
    )


def _in_use(where: str, holder: str, purpose: str) -> RunLockedError:
    return RunLockedError(f"{where} is in use by {holder}: {purpose}")


class LocalLock:
    def __init__(self, directory: str, run_id: str, what: str = "run", purpose: str = ""):
        self.path = os.path.join(directory, LOCK_NAME)
        self.run_id, self.what, self.purpose = run_id, what, purpose
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
            except (ValueError, AttributeError):
                holder = "another process"
            raise _in_use(os.path.dirname(self.path), holder, self.purpose) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info(self.run_id, self.what)).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _precondition_failed(err: BaseException) -> bool:
    if isinstance(err, FileExistsError):  # s3fs's translation of If-None-Match failing
        return True
    cause = err.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


class ObjectStoreLock:
    def __init__(
        self,
        store: Store,
        run_id: str,
        what: str = "run",
        purpose: str = "",
    ):
        self.store = store
        self.fs = store.fs
        self.bucket, _, prefix = store.path().strip("/").partition("/")
        self.key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
        self.url = store.url_of(LOCK_NAME)
        self.run_id, self.what, self.purpose = run_id, what, purpose
        self.nonce = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _request(self, operation: str, **kwargs) -> dict:
        """One S3 request under the retry policy; a refused condition raises _LockConflict."""

        def attempt():
            try:
                return self.fs.call_s3(operation, Bucket=self.bucket, Key=self.key, **kwargs)
            except OSError as err:
                if _precondition_failed(err):
                    raise _LockConflict(str(err)) from err
                raise

        return self.store.retry.call(self.url, attempt)

    def _put(self, **condition) -> str:
        body = json.dumps(holder_info(self.run_id, self.what, self.nonce)).encode()
        return self._request("put_object", Body=body, **condition)["ETag"]

    def _current(self) -> tuple[dict, dict]:
        """(head answer, holder record) of the lock object as it is now."""
        head = self._request("head_object")
        body = self.store.read(LOCK_NAME)
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}
        return head, holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except _LockConflict:
            self._take_over_if_stale()
        except OSError as err:
            raise OSError(f"cannot create the lock {self.url}: {err}") from err
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self) -> None:
        head, holder = self._current()
        if holder.get("nonce") == self.nonce:  # our own create, whose answer was lost
            self.etag = head["ETag"]
            return
        server_now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - head["LastModified"]).total_seconds()
        if age < STALE_AFTER_S:
            raise _in_use(
                self.store.url,
                f"{describe(holder)}, last heartbeat {age:.0f} s ago",
                f"{self.purpose} (a lock without heartbeat for {STALE_AFTER_S:.0f} s is taken "
                f"over)",
            )
        try:
            self.etag = self._put(IfMatch=head["ETag"])
        except _LockConflict:
            raise RunLockedError(
                f"{self.url}: another run took over the stale lock at the same moment"
            ) from None
        print(
            f"took over the stale lock {self.url} of {describe(holder)} (no heartbeat for "
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
            return
        except _LockConflict:
            pass
        except Exception:  # the store is unreachable even after retries: try at the next beat
            return
        try:  # a retried renewal may have succeeded the first time: is the lock still ours?
            head, holder = self._current()
        except Exception:
            return
        if holder.get("nonce") == self.nonce:
            self.etag = head["ETag"]
            return
        self.lost = True
        print(
            f"LOST the lock {self.url}: another run took it over (this run missed heartbeats "
            f"for {STALE_AFTER_S:.0f} s); stopping without writing anything more there",
            flush=True,
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self.lost:
            # Taken over meanwhile, or the store is down: then it goes stale by itself.
            with contextlib.suppress(Exception):
                self._request("delete_object", IfMatch=self.etag)
            self.etag = None


class NoLock:
    """File systems without exclusive creation (fsspec's memory://, plain HTTP): nothing is
    locked; the caller is warned that keeping one writer per directory is up to them."""

    lost = False

    def __init__(self, url: str):
        self.url = url

    def acquire(self) -> None:
        print(
            f"warning: {self.url} cannot be locked (no exclusive writes on this file system); "
            f"make sure no other run writes there",
            flush=True,
        )

    def release(self) -> None:
        pass


def directory_lock(
    url: str,
    run_id: str,
    storage_options: dict | None = None,
    retry: RetryPolicy = RetryPolicy(),
    what: str = "run",
    purpose: str = "two runs must not write to one directory; stop that run or choose another "
    "directory",
):
    """The lock of a local directory, an S3 prefix, or (unlockable) another fsspec URL. `what`
    names the kind of holder in messages ("run", "make_shards"); `purpose` says why sharing is
    refused and what to do."""
    store = Store(url, storage_options, retry)
    if is_local(store.fs):
        return LocalLock(store.root, run_id, what, purpose)
    if hasattr(store.fs, "call_s3"):
        return ObjectStoreLock(store, run_id, what, purpose)
    return NoLock(url)

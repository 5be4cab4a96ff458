"""Storage access through fsspec URLs (local paths, ``s3://bucket/prefix``, ...) with bounded retries.

Every storage call goes through :meth:`RetryPolicy.call`. Transient failures (connection refused or
reset, timeouts, truncated HTTP bodies, 5xx answers) are retried with exponential backoff, and after
``attempts`` tries a :class:`StorageError` names the URL. Permanent failures are not retried: a missing
object raises ``FileNotFoundError`` for the caller to name, and refused access (wrong credentials,
missing permission) raises :class:`StorageError` at once.

For ``s3://`` URLs the policy's ``connect_timeout`` and ``read_timeout`` bound every request, and
neither botocore nor s3fs retries on its own (their defaults, several silent attempts of up to 60 s
each, multiplied with ours, looked like a hang). Each failed attempt is logged at once; with the
defaults a refused connection fails after about 8 s (the backoff sleeps) and an endpoint that
accepts connections but never answers after about attempts x read_timeout + 8 s (a minute).
The user's ``storage_options["config_kwargs"]`` override the timeouts. S3-compatible stores are
selected with ``storage_options={"client_kwargs": {"endpoint_url": URL}}`` (or the standard
``AWS_ENDPOINT_URL`` environment variable); credentials come from the standard AWS environment
variables, config files or instance roles.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from arflow.data.errors import StorageError

log = logging.getLogger("arflow.data")

T = TypeVar("T")

# botocore's own retries are off: RetryPolicy retries (and logs each retry) itself.
S3_CLIENT_RETRIES = {"total_max_attempts": 1, "mode": "standard"}

# fsspec's s3 read-ahead block is 50 MiB; shards are read sequentially by several open readers per
# worker, so a smaller block bounds memory without hurting throughput.
READ_BLOCK_SIZE = 8 * 2**20

_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed (network trouble, timeouts, server errors)."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(
        exc, OSError
    ):  # ConnectionError, TimeoutError and s3fs's translation of 5xx answers
        return True
    # botocore's and aiohttp's network errors do not derive from OSError; import them only if in use.
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(
        exc, (botocore.HTTPClientError, botocore.ConnectionError)
    ):
        return True
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, aiohttp.ClientError)


@dataclass(frozen=True)
class RetryPolicy:
    """How patiently storage is used: ``attempts`` tries per request with exponential backoff
    (base_delay * 2**i seconds between them, capped at max_delay), and per-request timeouts in
    seconds for object stores (connecting, and waiting for each part of an answer)."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0

    def call(self, url: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a storage request about ``url``), retrying transient failures."""
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # classified below; everything else propagates unchanged
                if isinstance(exc, PermissionError):
                    raise StorageError(
                        f"{url}: access denied ({exc}); check the credentials (AWS_ACCESS_KEY_ID / "
                        f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the endpoint URL"
                    ) from exc
                if not is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise StorageError(
                        f"{url}: gave up after {attempt} attempts in {time.monotonic() - started:.1f} s: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                log.warning(
                    "%s: transient %s (%s); retry %d/%d in %.1f s",
                    url,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


def filesystem(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``url``; S3 clients get the policy's
    timeouts and no retries of their own."""
    options = copy.deepcopy(storage_options or {})  # botocore mutates its config dict in place
    s3 = url.startswith(("s3://", "s3a://"))
    if s3:
        config = options.setdefault("config_kwargs", {})
        config.setdefault("connect_timeout", retry.connect_timeout)
        config.setdefault("read_timeout", retry.read_timeout)
        config.setdefault("retries", copy.deepcopy(S3_CLIENT_RETRIES))
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3:
        fs.retries = 1  # s3fs's silent retries (5 by default, a class attribute) off
    return fs, path


def join_url(root: str, relative: str) -> str:
    """``root``/``relative`` for local paths and URLs alike."""
    return root.rstrip("/") + "/" + relative.lstrip("/")


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def read_bytes(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> bytes:
    fs, path = filesystem(url, storage_options, retry)
    return retry.call(url, lambda: fs.cat_file(path))


def ensure_parent(url: str, storage_options: dict | None = None) -> None:
    """Create the parent directory of a local output; object stores have no directories to create."""
    fs, path = filesystem(url, storage_options)
    if "file" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def partial_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Where to write an object before it is complete.

    A file is written under a temporary name and renamed, so no reader ever sees half of it. An S3
    object only becomes visible once its upload completes, and a rename there is a full server-side
    copy, so objects are written in place.
    """
    return path if "s3" in fs.protocol else path + ".partial"


def write_atomic(
    url: str, data: bytes, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> None:
    """Write ``data`` so that readers see either the old object or all of the new one."""
    fs, path = filesystem(url, storage_options, retry)
    ensure_parent(url, storage_options)
    partial = partial_path(fs, path)

    def attempt() -> None:
        fs.pipe_file(partial, data)
        if partial != path:
            fs.mv(partial, path)

    retry.call(url, attempt)


class HashingWriter:
    """Write-only file wrapper that counts and hashes what passes through it."""

    def __init__(self, file):
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


class RetryingReader:
    """Sequential read-only view of one object that survives transient failures mid-stream.

    A failed read reopens the object and seeks to the byte already reached, so a consumer such as
    ``tarfile`` streaming mode never notices. Also hashes (sha256) and counts the bytes delivered.
    """

    def __init__(
        self, url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
    ):
        self.url = url
        self._retry = retry
        self._fs, self._path = filesystem(url, storage_options, retry)
        self._file = None
        self.position = 0
        self.sha256 = hashlib.sha256()
        self._retry.call(url, self._reopen)

    def _reopen(self) -> None:
        self._file = self._fs.open(self._path, "rb", block_size=READ_BLOCK_SIZE)
        if self.position:
            self._file.seek(self.position)

    def read(self, size: int = -1) -> bytes:
        def attempt() -> bytes:
            if self._file is None:
                self._reopen()
            try:
                return self._file.read(size)
            except Exception:
                self._discard()
                raise

        data = self._retry.call(self.url, attempt)
        self.position += len(data)
        self.sha256.update(data)
        return data

    def read_to_end(self) -> None:
        while self.read(READ_BLOCK_SIZE):
            pass

    def _discard(self) -> None:
        file, self._file = self._file, None
        with contextlib.suppress(Exception):  # the connection is already broken: best effort
            file.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

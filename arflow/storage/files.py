"""Files on local disk, a shared file system or an object store (``s3://bucket/prefix``), through
fsspec, every request under one :class:`RetryPolicy`.

For ``s3://`` URLs the policy's ``connect_timeout`` and ``read_timeout`` bound every request, and
neither botocore nor s3fs retries on its own (their defaults, several silent attempts of up to
60 s each, multiplied with ours, looked like a hang). The user's ``storage_options["config_kwargs"]``
override the timeouts. S3-compatible stores are selected with
``storage_options={"client_kwargs": {"endpoint_url": URL}}`` (or ``AWS_ENDPOINT_URL``); credentials
come from the standard AWS environment variables, config files or instance roles.

Object stores have objects, not directories: :class:`Store` lists, copies and deletes a "directory"
object by object (never s3fs's recursive ``mv``, which trips over directory-marker keys), in an
order that keeps each operation safe to repeat after a crash.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from arflow.storage.hashing import HashingWriter
from arflow.storage.retry import RetryPolicy, error_code

# botocore's own retries are off: RetryPolicy retries (and logs each retry) itself.
S3_CLIENT_RETRIES = {"total_max_attempts": 1, "mode": "standard"}

# fsspec's s3 read-ahead block is 50 MiB; shards are read sequentially by several open readers per
# worker, so a smaller block bounds memory without hurting throughput.
READ_BLOCK_SIZE = 8 * 2**20
# Reading ahead (RetryingReader's read_ahead), each request asks for this much (the part size of
# AWS's own transfer clients): a 25 ms first-byte latency costs little per byte, and a server
# that copies the whole object per ranged request (moto) is not asked 13 times per 50 MB shard.
READ_AHEAD_CHUNK = 8 * 2**20


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


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


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
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def partial_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Where to write an object before it is complete.

    A file is written under a temporary name and renamed, so no reader ever sees half of it. An
    object-store object only becomes visible once its upload completes, and a rename there is a
    full server-side copy, so objects are written in place.
    """
    return path + ".partial" if is_local(fs) else path


def _write_local_atomic(path: str, data: bytes) -> None:
    """Temporary name, fsync, rename, fsync of the directory: whole or absent after a crash."""
    tmp = f"{path}.partial"
    with HashingWriter(tmp, fsync=True) as f:  # errors (disk full) name the file
        f.write(data)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    url: str, data: bytes, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> None:
    """Write ``data`` so that readers see either the old object or all of the new one."""
    fs, path = filesystem(url, storage_options, retry)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_local_atomic(path, data)
        return
    retry.call(url, lambda: fs.pipe_file(path, data))  # an object appears whole or not at all


class RetryingReader:
    """Sequential read-only view of one object that survives transient failures mid-stream.

    A failed read reopens the object and seeks to the byte already reached, so a consumer such as
    ``tarfile`` streaming mode never notices. Counts the bytes delivered (``position``) and hashes
    those received (``sha256``: the same bytes once the object was read to the end).

    On an object store, ``read_ahead`` (bytes) starts a background thread that downloads the
    object in ``READ_AHEAD_CHUNK`` requests, up to that far ahead of the consumer (a request starts
    when the consumer takes a part), so that each request's latency overlaps with the consumer's
    work instead of adding to it; its errors, after their retries, reach the consumer at the byte where they happened.
    ``size`` (the object's size, when the caller knows it) then saves the HEAD request that
    opening costs; an object shorter than that simply ends early. Local files are read directly.
    A missing object raises ``FileNotFoundError`` from the constructor, or with ``read_ahead``
    from the first read.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        retry: RetryPolicy = RetryPolicy(),
        *,
        size: int | None = None,
        read_ahead: int = 0,
    ):
        self.url = url
        self._retry = retry
        self._fs, self._path = filesystem(url, storage_options, retry)
        ahead = read_ahead and not is_local(self._fs)
        self._open_kwargs = {"block_size": READ_BLOCK_SIZE}
        self._details = None
        if ahead:  # each of the thread's reads is one request: no second buffer
            self._open_kwargs.update(block_size=READ_AHEAD_CHUNK, cache_type="none")
            if size is not None:
                self._open_kwargs["size"] = size
                # what s3fs would otherwise ask a HEAD request for before the first GET
                self._details = {"name": self._path, "size": size}
        self._file = None
        self._received = 0  # bytes received from storage (ahead of `position` when reading ahead)
        self.position = 0
        self.sha256 = hashlib.sha256()
        self._ahead = None
        if ahead:
            self._ahead = _ReadAhead(
                self._fetch, READ_AHEAD_CHUNK, max(1, read_ahead // READ_AHEAD_CHUNK), self._discard
            )
        else:
            self._retry.call(url, self._reopen)

    def _reopen(self) -> None:
        self._file = self._fs.open(self._path, "rb", **self._open_kwargs)
        if self._details is not None:
            self._file.details = self._details
        if self._received:
            self._file.seek(self._received)

    def _fetch(self, size: int) -> bytes:
        """One read from storage at the byte received so far, retried."""

        def attempt() -> bytes:
            if self._file is None:
                self._reopen()
            try:
                return self._file.read(size)
            except Exception as exc:
                self._discard()
                if error_code(exc) == "InvalidRange":  # shorter than `size` said: this is its end
                    return b""
                raise

        data = self._retry.call(self.url, attempt)
        self._received += len(data)
        self.sha256.update(data)  # in the read-ahead thread, off the consumer's path
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._ahead.read(size) if self._ahead is not None else self._fetch(size)
        self.position += len(data)
        return data

    def read_to_end(self) -> None:
        while self.read(READ_BLOCK_SIZE):
            pass

    def _discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):  # the connection may be broken: best effort
                file.close()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()  # the thread closes the file when it stops
        else:
            self._discard()


class _ReadAhead:
    """Calls ``fetch(chunk)`` in a daemon thread until it returns b"" (the end) or raises, keeping
    at most ``depth`` results waiting; ``read`` hands them out in order (an error in its place)."""

    def __init__(self, fetch: Callable[[int], bytes], chunk: int, depth: int, on_exit):
        self._items: collections.deque = collections.deque()
        self._depth = depth
        self._changed = threading.Condition()
        self._closed = False
        self._ended = False
        self._pending, self._start = b"", 0  # the part being handed out, and how far
        threading.Thread(
            target=self._run, args=(fetch, chunk, on_exit), name="arflow-read-ahead", daemon=True
        ).start()

    def _run(self, fetch, chunk: int, on_exit) -> None:
        try:
            while True:
                with self._changed:
                    while len(self._items) >= self._depth and not self._closed:
                        self._changed.wait()
                    if self._closed:
                        return
                try:
                    item = fetch(chunk)
                except BaseException as exc:  # handed to the consumer, raised there
                    item = exc
                with self._changed:
                    self._items.append(item)
                    self._changed.notify_all()
                if not isinstance(item, bytes) or not item:
                    return
        finally:
            on_exit()

    def _next(self) -> bytes:
        with self._changed:
            while not self._items:
                self._changed.wait()
            item = self._items.popleft()
            self._changed.notify_all()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = not item
        return item

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(READ_AHEAD_CHUNK), b""))
        if self._start == len(self._pending) and not self._ended:
            self._pending, self._start = self._next(), 0
        data, start = self._pending, self._start
        self._start = min(len(data), start + size)
        if start == 0 and self._start == len(data):
            return data  # the whole part, uncopied
        return data[start : self._start]  # copies only what is handed out

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._items.clear()
            self._changed.notify_all()


class Store:
    """A root directory (local, shared, or an object-store prefix) and the operations the
    checkpoints and the run lock need; `rel` paths are relative to the root, with `/`.

    Every remote request goes through the retry policy, and nothing is answered from fsspec's
    listings cache (other ranks and processes write here too, and s3fs would trust a stale
    listing of a parent over the store itself). "Directories" are handled object by object:
    `remove_tree` deletes the commit marker first, so a crash mid-way leaves an incomplete
    directory (removed at the next start), never a complete-looking one with missing files;
    `move_tree` copies everything, the marker last, then removes the source the same way, so it
    can be repeated after a crash at any point and never loses the only complete copy.
    """

    def __init__(
        self, url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
    ):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.retry = retry
        options = dict(self.storage_options)
        if self.url.startswith(("s3://", "s3a://")):
            options.setdefault("use_listings_cache", False)
        self.fs, path = filesystem(self.url, options, retry)
        self.root = path.rstrip("/")
        self.local = is_local(self.fs)
        # Uploads wait longer for the answer: S3 assembles a multipart object before it answers.
        patient = dataclasses.replace(
            retry, read_timeout=max(retry.read_timeout, retry.commit_timeout)
        )
        self._upload_fs = self.fs if self.local else filesystem(self.url, options, patient)[0]

    def path(self, rel: str = "") -> str:
        """The path of `rel` in the file system (a local path, or bucket/key)."""
        return "/".join(p for p in (self.root, rel.strip("/")) if p)

    def url_of(self, rel: str = "") -> str:
        """`rel` as users name it: a local path, or a URL with its protocol."""
        if self.local:
            return self.path(rel)
        return "/".join(p for p in (self.url, rel.strip("/")) if p)

    def _call(self, rel: str, fn):
        return self.retry.call(self.url_of(rel), fn)

    # ------------------------------------------------------------------------------ reading
    def exists(self, rel: str = "") -> bool:
        return self._call(rel, lambda: self.fs.exists(self.path(rel)))

    def read(self, rel: str, limit: int | None = None) -> bytes:
        """The bytes of `rel` (FileNotFoundError when absent); with `limit`, a file larger than
        that raises ValueError before it is read."""
        path = self.path(rel)

        def attempt() -> bytes:
            if limit is not None:
                size = self.fs.size(path)
                if size is not None and size > limit:
                    raise ValueError(f"{self.url_of(rel)} is {size} bytes, more than {limit}")
            return self.fs.cat_file(path)

        return self._call(rel, attempt)

    def children(self, rel: str = "") -> list[str]:
        """The names directly under `rel` (files and directories); [] when it does not exist."""
        path = self.path(rel)

        def attempt() -> list[str]:
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

        return self._call(rel, attempt)

    def files(self, rel: str) -> list[str]:
        """Every file (object) under `rel`, relative to it, sorted; [] when it does not exist."""
        base = self.path(rel)
        found = self._call(rel, lambda: self.fs.find(base, withdirs=False))
        return sorted(p[len(base) + 1 :] for p in found if p.startswith(base + "/"))

    def sizes(self, rel: str) -> dict[str, int]:
        """Name (relative to `rel`) -> size in bytes of every file under `rel`, in one listing."""
        base = self.path(rel)
        found = self._call(rel, lambda: self.fs.find(base, withdirs=False, detail=True))
        return {
            p[len(base) + 1 :]: int(info["size"])
            for p, info in found.items()
            if p.startswith(base + "/")
        }

    def download(self, rel: str, names: Iterable[str], local_dir: str) -> None:
        """Copy the files `names` (relative to `rel`) into `local_dir`, one request each."""
        for name in names:
            target = os.path.join(local_dir, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = self.path(f"{rel}/{name}")
            self._call(f"{rel}/{name}", lambda s=source, t=target: self.fs.get_file(s, t))

    # ------------------------------------------------------------------------------ writing
    def write_atomic(self, rel: str, data: bytes) -> None:
        """A file that appears whole or not at all."""
        if self.local:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            _write_local_atomic(self.path(rel), data)
        else:
            self._call(rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def upload(self, local_dir: str, names: Iterable[str], rel: str) -> None:
        """Copy the files `names` of `local_dir` to `rel`/name, one request each."""
        for name in names:
            source = os.path.join(local_dir, *name.split("/"))
            target = self.path(f"{rel}/{name}")
            self._call(f"{rel}/{name}", lambda s=source, t=target: self._upload_fs.put_file(s, t))

    def remove(self, rel: str) -> None:
        """Delete one file; absent already is fine."""
        path = self.path(rel)

        def attempt() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self._call(rel, attempt)

    def remove_tree(self, rel: str, first: Iterable[str] = ()) -> None:
        """Delete `rel` and everything under it, the files `first` before the rest."""
        for name in first:
            self.remove(f"{rel}/{name}")
        if self.local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
            return
        for name in self.files(rel):
            self.remove(f"{rel}/{name}")

    def move_tree(self, src: str, dst: str, last: Iterable[str] = ()) -> None:
        """Move the directory `src` to `dst`. Locally one atomic rename. On an object store:
        copy every file, the files `last` after the others, then delete the source with those
        same files first; repeatable after a crash at any point."""
        last = list(last)
        if self.local:
            if os.path.exists(self.path(src)):
                os.replace(self.path(src), self.path(dst))
            return
        names = self.files(src)
        ordered = [n for n in names if n not in last] + [n for n in last if n in names]
        for name in ordered:
            source, target = self.path(f"{src}/{name}"), self.path(f"{dst}/{name}")
            self._call(f"{src}/{name}", lambda s=source, t=target: self.fs.copy(s, t))
        self.remove_tree(src, first=[n for n in last if n in names])

"""File sizes and SHA-256 checksums, computed while a file is written and checked before it is
read, so that a truncated or bit-flipped file is named instead of silently loaded.

    recorder = FileRecorder(root)
    with recorder.open("trainer/rank_00000.pt") as f:   # hashes on the way out
        torch.save(state, f)
    recorder.records  # {"trainer/rank_00000.pt": {"size": ..., "sha256": ...}}
    problems = verify_files(root, recorder.records)    # [] when every file is intact

Write errors (disk full, permissions, file too large) are re-raised as OSError naming the path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

CHUNK = 8 << 20
PARALLEL = 1 << 20  # writes at least this large are hashed concurrently with the write
# A directory whose MANIFEST lists its files under "files" ({relpath: {"size", "sha256"}}), as
# the trainer's checkpoint step directories do.
MANIFEST = "meta.json"


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")


class HashingWriter:
    """A binary file open for writing that hashes and counts every byte written through it.
    Enough of the file protocol for torch.save, safetensors bytes and torch DCP's writer."""

    def __init__(self, path: str, on_close=None, fsync: bool = True):
        self.path = path
        self._on_close = on_close
        self._fsync = fsync
        self._hash = hashlib.sha256()
        self.size = 0
        try:
            self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        except OSError as err:
            raise _named(err, path) from None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        # Large buffers are hashed on another thread while this one writes them (both release
        # the GIL), so a save costs max(write, hash) rather than their sum; the buffer is only
        # ours until write returns, so the hash is waited for before returning.
        pending = _hasher().submit(self._hash.update, view) if len(view) >= PARALLEL else None
        try:
            written = self._file.write(view)
        except OSError as err:
            raise _named(err, self.path) from None
        finally:
            if pending is not None:
                pending.result()
        if pending is None:
            self._hash.update(view)
        self.size += len(view)
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            raise _named(err, self.path) from None

    def fileno(self) -> int:
        return self._file.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            if self._fsync:  # on disk before the checkpoint that lists it is committed
                os.fsync(self._file.fileno())
            self._file.close()
        except OSError as err:
            raise _named(err, self.path) from None
        if self._on_close is not None:
            self._on_close(self.path, {"size": self.size, "sha256": self._hash.hexdigest()})

    def abort(self) -> None:
        self._file.close()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _named(err: OSError, path: str) -> OSError:
    """The same error with the path in its message (a full disk reports none by itself)."""
    if err.filename:
        return err
    return type(err)(err.errno, f"{err.strerror or err} (writing {path})", path)


class FileRecorder:
    """Size and checksum of each file written under `root`, keyed by relative path (`/`).
    Thread-safe: torch DCP writes files from several threads."""

    def __init__(self, root: str, fsync: bool = True):
        self.root = root
        self.fsync = fsync
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()

    def relpath(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def open(self, relpath_or_path: str) -> HashingWriter:
        path = os.path.join(self.root, relpath_or_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return HashingWriter(path, on_close=self._record, fsync=self.fsync)

    def _record(self, path: str, record: dict) -> None:
        with self._lock:
            self.records[self.relpath(path)] = record

    def rename(self, src: str, dst: str) -> None:
        """A recorded file renamed (written under a temporary name, then moved in place)."""
        os.replace(src, dst)
        with self._lock:
            record = self.records.pop(self.relpath(src), None)
            if record is not None:
                self.records[self.relpath(dst)] = record

    def add_unrecorded(self, relpaths: Iterable[str]) -> None:
        """Hash files that were written without passing through `open` (a library's own
        writes): read back once."""
        for rel in relpaths:
            if rel not in self.records:
                self.records[rel] = file_record(os.path.join(self.root, rel))


def file_record(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def list_files(root: str) -> list[str]:
    """Every file under `root`, as sorted relative paths with `/`."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def verify_file(root: str, rel: str, expected: dict) -> str | None:
    """None when `root/rel` has the expected size and checksum, else what is wrong."""
    path = os.path.join(root, rel)
    try:
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{rel}: {size} bytes, expected {expected['size']} (truncated or overwritten)"
        if file_record(path)["sha256"] != expected["sha256"]:
            return f"{rel}: checksum mismatch (the file's contents changed after it was written)"
    except FileNotFoundError:
        return f"{rel}: missing"
    except OSError as err:
        return f"{rel}: unreadable ({err})"
    return None


def verify_files(
    root: str, expected: dict[str, dict], only: Iterable[str] | None = None
) -> list[str]:
    """Problems found among the files of `expected` (or the subset `only`) under `root`."""
    names = sorted(expected) if only is None else sorted(only)
    return [p for rel in names if (p := verify_file(root, rel, expected[rel])) is not None]


def verify_listed(path: str) -> None:
    """Check `path` against the manifest of its directory, if that manifest lists it; raise
    ValueError naming the file when it differs."""
    directory, name = os.path.split(os.path.abspath(path))
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest):
        return
    try:
        with open(manifest) as f:
            files = json.load(f).get("files", {})
    except ValueError as err:
        raise ValueError(f"{manifest} is corrupt (not JSON: {err})") from None
    if name in files and (problem := verify_file(directory, name, files[name])):
        raise ValueError(f"{directory}: {problem}")

"""File sizes and SHA-256 checksums, computed while a file is written and checked before it is
read, so that a truncated or bit-flipped file is named instead of silently loaded.

    recorder = FileRecorder(root)
    with recorder.open("trainer/rank_00000.pt") as f:   # hashes on the way out
        torch.save(state, f)
    recorder.records  # {"trainer/rank_00000.pt": {"size": ..., "sha256": ...}}
    problems = verify_files(root, recorder.records)    # [] when every file is intact

Nothing a listing says is trusted: a listed path must be relative and stay inside the root, name
a regular file (no link, device or directory), and is read for at most its recorded size.
Write errors (disk full, permissions, file too large) are re-raised as OSError naming the path,
also when a library (torch.save's zip writer) swallows them and fails with a message of its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

CHUNK = 8 << 20
PARALLEL = 1 << 20  # writes at least this large are hashed concurrently with the write
# A directory whose MANIFEST lists its files under "files" ({relpath: {"size", "sha256"}}), as
# the trainer's checkpoint step directories do.
MANIFEST = "meta.json"
MAX_FILE_BYTES = 1 << 42  # 4 TiB: a recorded size beyond this is not a real checkpoint file


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")


class HashingWriter:
    """A binary file open for writing that hashes and counts every byte written through it.
    Enough of the file protocol for torch.save, safetensors bytes, tar writers and torch DCP.

    `file`: an open binary file (local or fsspec), or a local path to create. `name` is what
    errors say (default: the path). A local path is fsync'd at close when `fsync`. The first
    write error is kept in `error`, so a caller whose library turned it into another exception
    can raise the named one instead (`raise_write_error`)."""

    def __init__(self, file, name: str | None = None, on_close=None, fsync: bool = False):
        self.name = name or (file if isinstance(file, str) else getattr(file, "name", "?"))
        self._owned = isinstance(file, str)
        self._on_close = on_close
        self._fsync = fsync and self._owned
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        try:
            self._file = open(file, "wb") if self._owned else file  # noqa: SIM115 (see close)
        except OSError as err:
            raise _named(err, self.name) from None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        # Large buffers are hashed on another thread while this one writes them (both release
        # the GIL), so a save costs max(write, hash) rather than their sum; the buffer is only
        # ours until write returns, so the hash is waited for before returning.
        pending = _hasher().submit(self._hash.update, view) if len(view) >= PARALLEL else None
        try:
            written = self._file.write(view)
        except OSError as err:
            self.error = self.error or _named(err, self.name)
            raise self.error from None
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
            self.error = self.error or _named(err, self.name)
            raise self.error from None

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
            if self._owned:
                self._file.close()
        except OSError as err:
            self.error = self.error or _named(err, self.name)
            raise self.error from None
        if self._on_close is not None:
            self._on_close(self, {"size": self.size, "sha256": self.sha256})

    def abort(self) -> None:
        if self._owned:
            self._file.close()

    def raise_write_error(self) -> None:
        """Raise the write error this file met, if any (named)."""
        if self.error is not None:
            raise self.error

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
    """Size and checksum of each file written under the local directory `root`, keyed by
    relative path (`/`). Thread-safe: torch DCP writes files from several threads."""

    def __init__(self, root: str, fsync: bool = True):
        self.root = root
        self.fsync = fsync
        self.records: dict[str, dict] = {}
        self._writers: list[HashingWriter] = []
        self._lock = threading.Lock()

    def relpath(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def open(self, relpath_or_path: str) -> HashingWriter:
        path = os.path.join(self.root, relpath_or_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = HashingWriter(path, on_close=self._record, fsync=self.fsync)
        with self._lock:
            self._writers.append(writer)
        return writer

    def _record(self, writer: HashingWriter, record: dict) -> None:
        with self._lock:
            self.records[self.relpath(writer.name)] = record

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

    def raise_write_error(self) -> None:
        """Raise the first write error any of this recorder's files met (disk full, ...),
        naming the file; a library may have reported it as something else."""
        with self._lock:
            errors = [w.error for w in self._writers if w.error is not None]
        if errors:
            raise errors[0]


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


def unsafe_relpath(rel) -> str | None:
    """Why `rel` cannot name a file inside a directory (absolute, `..`, empty parts,
    backslashes, NUL), or None when it is a plain relative path."""
    if not isinstance(rel, str) or not rel:
        return "not a relative path"
    if "\\" in rel or "\x00" in rel:
        return "contains a backslash or NUL"
    if rel.startswith("/") or posixpath.isabs(rel):
        return "an absolute path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has empty, '.' or '..' parts"
    return None


def bad_record(record) -> str | None:
    """Why a listing's record ({"size", "sha256"}) is unusable, or None."""
    if not isinstance(record, dict):
        return "its record is not an object"
    size, sha = record.get("size"), record.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        return f"recorded size {size!r} is not a number of bytes in [0, {MAX_FILE_BYTES}]"
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return f"recorded sha256 {sha!r} is not 64 hex digits"
    return None


def verify_file(root: str, rel: str, expected: dict) -> str | None:
    """None when `root/rel` is a regular file inside `root` with the expected size and
    checksum, else what is wrong. Reads at most the recorded size (+1 byte to see more)."""
    why = unsafe_relpath(rel) or bad_record(expected)
    if why:
        return f"{rel!r}: listed path refused ({why})"
    path = os.path.join(root, *rel.split("/"))
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        return f"{rel}: resolves outside the checkpoint (a link), refused"
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"{rel}: not a regular file (a link, device or directory), refused"
        if info.st_size != expected["size"]:
            return (
                f"{rel}: {info.st_size} bytes, expected {expected['size']} (truncated or "
                f"overwritten)"
            )
        h, left = hashlib.sha256(), expected["size"] + 1
        with open(path, "rb") as f:
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                h.update(chunk)
                left -= len(chunk)
        if left != 1 or h.hexdigest() != expected["sha256"]:
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
        with open(manifest, "rb") as f:
            files = json.loads(f.read(64 << 20)).get("files", {})
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{manifest} is corrupt (not a JSON object: {err})") from None
    if isinstance(files, dict) and name in files:
        problem = verify_file(directory, name, files[name])
        if problem:
            raise ValueError(f"{directory}: {problem}")

"""Shard format, writing and reading.

A shard is an uncompressed WebDataset tar holding samples of one class. A sample is two members::

    <class:05d>_<index:07d>.cls   the class id as decimal text
    <class:05d>_<index:07d>.npy   the stored array (see the manifest's "stored" dtype and shape)

Members are written with a fixed mtime, so identical content gives identical bytes (and checksums).

Shards are written with webdataset's TarWriter (``tarfile`` underneath). Reading streams the tar
front to back in large chunks (:func:`tar_members`), so a shard on object storage is fetched with
sequential range requests and never needs random access. A sample that cannot be read or decoded
is reported and skipped; a shard whose bytes do not hash to the manifest's sha256 while every
sample decoded raises :class:`ShardError`.
"""

from __future__ import annotations

import functools
import io
import math
import posixpath
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import webdataset as wds

from arflow.data.errors import ShardError
from arflow.data.manifest import ShardInfo
from arflow.storage import (
    HashingWriter,
    RetryingReader,
    RetryPolicy,
    ensure_parent,
    filesystem,
    join_url,
    partial_path,
)

PAYLOAD = "npy"
LABEL = "cls"
# Tar headers carry this mtime; a constant makes shards byte-for-byte reproducible.
MTIME = 0


def sample_key(class_id: int, index: int) -> str:
    return f"{class_id:05d}_{index:07d}"


def record_bytes(class_id: int, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes one sample takes in a shard: per member a 512-byte tar header plus data padded to 512."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype))
    return sum(512 + -(-size // 512) * 512 for size in (buffer.tell(), len(str(class_id))))


def write_shard(
    url: str,
    class_id: int,
    arrays: list[np.ndarray],
    keys: list[str],
    storage_options: dict | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> tuple[int, str]:
    """Write one shard atomically (see ``arflow.storage.partial_path``). Returns (bytes, sha256 hex).

    arrays: the stored array of each sample, all of one dtype and shape; keys: their sample keys.
    A transient storage failure rewrites the shard from the start (bounded by ``retry``).
    """
    fs, path = filesystem(url, storage_options, retry)
    ensure_parent(url, storage_options)
    partial = partial_path(fs, path)

    def attempt() -> tuple[int, str]:
        with fs.open(partial, "wb") as file:
            out = HashingWriter(file)
            with wds.TarWriter(out, mtime=MTIME) as tar:
                for key, array in zip(keys, arrays):
                    tar.write(
                        {"__key__": key, PAYLOAD: np.ascontiguousarray(array), LABEL: str(class_id)}
                    )
        if partial != path:
            fs.mv(partial, path)
        return out.size, out.sha256

    return retry.call(url, attempt)


def check_shards(
    shards: list[ShardInfo],
    root: str,
    storage_options: dict | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> None:
    """Raise ShardError naming every shard that does not exist.

    One recursive listing of the deepest directory under ``root`` (the shard set's root URL)
    that holds them all (usually ``shards/``), however many shards there are: a few paginated
    requests on object storage instead of one per shard. (A damaged shard is not an error here:
    reading skips its bad samples within the bad-sample budget.)
    """
    if not shards:
        return
    common = posixpath.commonpath([posixpath.dirname(s.path) for s in shards])
    listed_url = join_url(root, common) if common else root
    fs, base = filesystem(listed_url, storage_options, retry)
    found = set(retry.call(listed_url, lambda: fs.find(base)))
    prefix = base.rstrip("/") + "/"
    missing = [
        s.url for s in shards if prefix + posixpath.relpath(s.path, common or ".") not in found
    ]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        raise ShardError(
            f"{len(missing)} of the {len(shards)} shards listed in the manifest of {root} do not "
            f"exist: {shown}. Restore them, or rewrite the shard set with tools/make_shards.py "
            f"(a re-run rewrites only what is missing or damaged)"
        )


# Bytes each open shard on an object store is downloaded ahead of the reader (RetryingReader's
# read_ahead: one 8 MiB part): a window of latent samples (128 x 64 KiB) arrives while the other
# open shards are read. As much as s3fs's block cache held before.
SHARD_READ_AHEAD = 8 * 2**20


def open_shard(
    shard: ShardInfo,
    storage_options: dict | None = None,
    retry: RetryPolicy = RetryPolicy(),
    read_ahead: int = SHARD_READ_AHEAD,
) -> RetryingReader:
    """A reader of the shard's bytes. On an object store its size comes from the manifest (no HEAD
    request) and its download starts now, ``read_ahead`` bytes ahead of the consumer."""
    try:
        return RetryingReader(
            shard.url, storage_options, retry, size=shard.bytes, read_ahead=read_ahead
        )
    except FileNotFoundError:
        raise ShardError(f"shard {shard.url} listed in the manifest does not exist") from None


def iter_shard(
    shard: ShardInfo,
    *,
    dtype: str,
    shape: tuple[int, ...],
    on_bad: Callable[[str, int], None],
    storage_options: dict | None = None,
    retry: RetryPolicy = RetryPolicy(),
    verify: bool = True,
    reader: RetryingReader | None = None,
) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield ``(index, array)`` for index 0..shard.count-1 in stored order; ``None`` for a bad sample.

    ``on_bad(message, count)`` reports ``count`` bad samples: undecodable, of the wrong class, dtype
    or shape (one call each), or missing because the shard ends early (one call for all of them). After the last sample the rest of the object is read and
    its size and sha256 compared with the manifest when ``verify``: a mismatch raises
    :class:`ShardError` if no sample was bad (silent corruption or a shard from another run), and is
    reported through ``on_bad``'s earlier messages otherwise. ``reader``: the shard already opened
    (:func:`open_shard`), closed with the iterator; by default it is opened at the first sample.
    """
    reader = reader or open_shard(shard, storage_options, retry)
    try:
        yield from _samples(reader, shard, dtype, shape, on_bad, verify)
    except FileNotFoundError:  # deleted after the loader checked, found at its first read
        raise ShardError(f"shard {shard.url} listed in the manifest does not exist") from None
    finally:
        reader.close()


BLOCK = 512  # tar header and data granularity
READ_CHUNK = 2**20  # bytes per storage read while parsing
_REGULAR = (b"0", b"\0")
_END = bytes(BLOCK)


def tar_members(reader) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of each regular file of an uncompressed tar stream, in stored order.

    ``reader.read(size)`` is called for large chunks and the members are sliced out of them
    without copying (``data`` is a view into a chunk). Parses the POSIX ustar headers that
    ``tarfile`` writes for short ASCII names, the only kind make_shards writes, and checks each
    header's checksum; directories are skipped. Python's ``tarfile`` spends ~15 us per member
    on header parsing and copies, more than the loader spends on an image otherwise.

    Raises EOFError when the stream ends inside a member, ValueError on a header it cannot read
    (bad checksum, pax / GNU extensions); stops at the end-of-archive block or the end of the
    stream.
    """
    buffer, pos = b"", 0

    def available(size: int) -> bool:
        """Make buffer[pos : pos + size] hold the next ``size`` bytes if the stream has them."""
        nonlocal buffer, pos
        if len(buffer) - pos >= size:
            return True
        parts, have = [buffer[pos:]], len(buffer) - pos
        while have < size:
            chunk = reader.read(max(READ_CHUNK, size - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        buffer, pos = (parts[-1] if len(parts) == 2 and not parts[0] else b"".join(parts)), 0
        return have >= size

    while available(BLOCK):
        header = buffer[pos : pos + BLOCK]
        if header == _END:
            return  # end-of-archive marker
        stored = header[148:156].rstrip(b" \0")
        # the checksum field itself counts as eight spaces
        total = int(np.frombuffer(header, np.uint8).sum()) - sum(header[148:156]) + 8 * 32
        if not stored or int(stored, 8) != total:
            raise ValueError(f"tar header at byte {pos} has a bad checksum")
        kind = header[156:157]
        size = int(header[124:136].rstrip(b" \0") or b"0", 8)
        padded = BLOCK + -(-size // BLOCK) * BLOCK
        if not available(padded):
            raise EOFError("the stream ends inside a member")
        if kind in _REGULAR:
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0")
            if prefix:
                name = f"{prefix.decode()}/{name}"
            yield name, memoryview(buffer)[pos + BLOCK : pos + BLOCK + size]
        elif kind != b"5":  # a directory has no data
            raise ValueError(f"tar member type {kind!r} (extended header or link) is not read")
        pos += padded


def _samples(
    reader: RetryingReader,
    shard: ShardInfo,
    dtype: str,
    shape: tuple[int, ...],
    on_bad: Callable[[str, int], None],
    verify: bool,
) -> Iterator[tuple[int, np.ndarray | None]]:
    bad = 0

    def report(message: str, count: int = 1) -> None:
        nonlocal bad
        bad += count
        on_bad(f"shard {shard.url}: {message}", count)

    index = 0
    key, parts = None, {}
    try:
        for fname, data in tar_members(reader):
            name, _, ext = fname.partition(".")
            if name != key:
                if parts:  # the previous sample lacked a member
                    report(f"member {key}: incomplete sample (has {sorted(parts)}), skipped")
                    yield index, None
                    index += 1
                key, parts = name, {}
            parts[ext] = data
            if PAYLOAD in parts and LABEL in parts:
                if index >= shard.count:
                    report(f"member {key}: more samples than the manifest's {shard.count}, ignored")
                else:
                    try:
                        array = _decode(parts, shard.class_id, dtype, shape)
                    except Exception as exc:  # any decoding failure condemns this sample only
                        report(f"member {key}.{PAYLOAD}: {exc}, skipped")
                        array = None
                    yield index, array
                index += 1
                parts = {}
        if parts:
            report(f"member {key}: incomplete sample (has {sorted(parts)}), skipped")
            yield index, None
            index += 1
        ended = "the shard ends early"
    except Exception as exc:  # tarfile's errors for a truncated or garbled stream
        if not _is_format_error(exc):
            raise
        ended = f"unreadable after member {key or '(none)'}: {type(exc).__name__}: {exc}"
    if index < shard.count:
        report(
            f"samples #{index}..#{shard.count - 1} missing ({ended}), skipped", shard.count - index
        )
        for missing in range(index, shard.count):
            yield missing, None
    if not verify:
        return
    try:
        reader.read_to_end()
    except Exception as exc:
        if not _is_format_error(exc):
            raise
    digest = reader.sha256.hexdigest()
    if (digest, reader.position) != (shard.sha256, shard.bytes) and bad == 0:
        raise ShardError(
            f"shard {shard.url}: checksum mismatch: the manifest says sha256 {shard.sha256} ({shard.bytes} bytes), "
            f"the shard has sha256 {digest} ({reader.position} bytes); it was modified or belongs to another "
            f"shard set; rewrite it with tools/make_shards.py"
        )


def _is_format_error(exc: BaseException) -> bool:
    return isinstance(exc, (tarfile.TarError, EOFError, ValueError, UnicodeDecodeError))


def _decode(parts: dict, class_id: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raise ValueError with the reason when the sample does not match its shard's description."""
    label = bytes(parts[LABEL]).decode("ascii", "replace").strip()
    if label != str(class_id):
        raise ValueError(f"class {label!r} in a shard of class {class_id}")
    data = parts[PAYLOAD]
    header = _npy_header(dtype, tuple(shape))
    expected_size = len(header) + np.dtype(dtype).itemsize * math.prod(shape)
    if len(data) == expected_size and data[: len(header)] == header:
        # the common case: exactly the bytes np.save writes for this dtype and shape, so the array
        # is a view of them; np.load would parse the header (a Python literal) for every sample
        return np.frombuffer(data, dtype, offset=len(header)).reshape(shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)  # anything else: np.load's diagnosis
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise ValueError(f"array {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}")
    return array


@functools.lru_cache(maxsize=8)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header np.save writes for an array of this dtype and shape."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype))
    return buffer.getvalue()[: -np.dtype(dtype).itemsize * math.prod(shape)]

"""Storage: one layer for everything the framework reads and writes by URL (local paths, shared
file systems, ``s3://``): training data, checkpoints and the locks that keep one writer per
directory. One retry policy (`retry`), one set of file operations (`files`), one way to record
and check sizes and checksums (`hashing`), one lock (`lock`)."""

from arflow.storage.files import (
    RetryingReader,
    Store,
    ensure_parent,
    filesystem,
    is_local,
    join_url,
    parent_url,
    partial_path,
    read_bytes,
    write_atomic,
)
from arflow.storage.hashing import FileRecorder, HashingWriter, file_record, verify_files
from arflow.storage.lock import RunLockedError, directory_lock
from arflow.storage.retry import RetryPolicy, StorageError, is_transient

__all__ = [
    "FileRecorder",
    "HashingWriter",
    "RetryPolicy",
    "RetryingReader",
    "RunLockedError",
    "StorageError",
    "Store",
    "directory_lock",
    "ensure_parent",
    "file_record",
    "filesystem",
    "is_local",
    "is_transient",
    "join_url",
    "parent_url",
    "partial_path",
    "read_bytes",
    "verify_files",
    "write_atomic",
]

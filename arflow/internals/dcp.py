"""torch.distributed.checkpoint (DCP) internals ARFlow relies on, checked when imported.

- `FileSystemWriter.fs` / `FileSystemReader.fs`: the object every DCP file is created, opened
  and renamed through; replaced to write through the checkpoint's recorder, and used to read
  `.metadata` (arflow.distributed.dcp_io).
- What `FileSystemReader.read_metadata` does around its plain `pickle.load`: the file's name
  (`.metadata`, `__<rank>.metadata` per rank) under the reader's `path`, and the reader's
  `load_id` stamped on the result's `StorageMeta`. ARFlow repeats it with an allowlisting
  unpickler in place of `pickle.load`.
- The globals a `.metadata` pickle refers to (`is_metadata_global`), private ones among them
  (`_MEM_FORMAT_ENCODING`, `_StorageInfo`, `torch.serialization._get_layout`).

Its own module (not arflow.internals.torch) because importing DCP takes about a second, which
code that never touches a DCP checkpoint should not pay. The versions are torch's
(arflow.internals.torch.SUPPORTED).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, filesystem
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from arflow.internals.torch import SUPPORTED

METADATA_FILE = ".metadata"

_METADATA_CLASSES = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = frozenset(
    {
        (_METADATA_CLASSES, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


def is_metadata_global(module: str, name: str) -> bool:
    """A global a DCP `.metadata` pickle may refer to: DCP's metadata classes and what they
    hold (sizes, dtypes, layouts, paths)."""
    return (module, name) in METADATA_GLOBALS or (
        module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    )


def replace_filesystem(storage: FileSystemWriter | FileSystemReader, fs: FileSystem) -> None:
    """Make `storage` create, open and rename every file of the checkpoint through `fs`."""
    storage.fs = fs


def metadata_path(reader: FileSystemReader, rank: int | None = None) -> str:
    """Where `reader.read_metadata(rank=rank)` reads the checkpoint's metadata."""
    name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
    return str(reader.fs.concat_path(reader.path, name))


def read_bytes(reader: FileSystemReader, path: str) -> bytes:
    """The whole file `path`, read through the reader's file system."""
    with reader.fs.create_stream(path, "rb") as stream:
        return stream.read()


def stamp_load_id(reader: FileSystemReader, metadata: Metadata) -> Metadata:
    """What `read_metadata` does after unpickling: the reader's load id on the metadata."""
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


def _resolves(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def check(installed: str = torch.__version__) -> None:
    """`installed` in torch's SUPPORTED range, and every internal above in place."""
    SUPPORTED.check(installed)
    SUPPORTED.require(
        installed,
        getattr(filesystem, "_metadata_fn", None) == METADATA_FILE,
        f"DCP's metadata file name {METADATA_FILE!r} (filesystem._metadata_fn)",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe")  # never created: the constructors only note it
        writer, reader = FileSystemWriter(path), FileSystemReader(path)
    for storage in (writer, reader):
        SUPPORTED.require(
            installed,
            isinstance(getattr(storage, "fs", None), FileSystem),
            f"the file system of DCP's {type(storage).__name__} (its `fs` attribute)",
        )
    for name in ("path", "load_id"):
        SUPPORTED.require_attribute(installed, reader, name, "DCP's FileSystemReader")
    fields = {f.name for f in dataclasses.fields(StorageMeta)}
    SUPPORTED.require(installed, "load_id" in fields, "DCP's StorageMeta.load_id")
    for method, names in (
        ("create_stream", ["self", "path", "mode"]),
        ("concat_path", ["self", "path", "suffix"]),
        ("rename", ["self", "path", "new_path"]),
    ):
        SUPPORTED.require_parameters(
            installed, getattr(FileSystem, method, None), names, f"DCP's FileSystem.{method}"
        )
    for module, name in sorted(METADATA_GLOBALS):
        SUPPORTED.require(
            installed, _resolves(module, name), f"{module}.{name} (a DCP metadata global)"
        )


check()

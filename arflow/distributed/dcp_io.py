"""torch.distributed.checkpoint (DCP) I/O for the native backends and the offline reader:
files written through the checkpoint's recorder (size and SHA-256 on the way out), and read
without executing code: DCP itself unpickles `.metadata` with plain `pickle` and its non-tensor
items (optimizer hyper-parameters) with `weights_only=False`; here the metadata goes through
an allowlist of DCP's own classes and the items through `weights_only=True`. What this needs
of DCP's internals lives in arflow.internals.dcp.
"""

from __future__ import annotations

import contextlib
import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from arflow.internals.dcp import (
    is_metadata_global,
    metadata_path,
    read_bytes,
    replace_filesystem,
    stamp_load_id,
)
from arflow.internals.torch import weights_only_damage, weights_only_refusal
from arflow.storage import FileRecorder
from arflow.utils.safe_load import CorruptFileError, UnsafeCheckpointError


class RecordingFileSystem(FileSystem):
    """DCP's local file system, with every file written through the checkpoint's recorder
    (size and SHA-256 computed on the way out)."""

    def __init__(self, recorder: FileRecorder):
        self.recorder = recorder

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.recorder.open(str(path)) as stream:
            yield stream

    def rename(self, path, new_path):
        self.recorder.rename(str(path), str(new_path))


class RecordingWriter(FileSystemWriter):
    def __init__(self, path: str, recorder: FileRecorder):
        super().__init__(path)
        replace_filesystem(self, RecordingFileSystem(recorder))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if is_metadata_global(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing {self.path}: its pickle asks for {module}.{name}, which is not a DCP "
            f"metadata class; it is never executed here"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with `.metadata` unpickled through an allowlist."""

    def read_metadata(self, *args, **kwargs):
        path = metadata_path(self, kwargs.get("rank"))
        try:
            metadata = _MetadataUnpickler(io.BytesIO(read_bytes(self, path)), path).load()
        except UnsafeCheckpointError:
            raise
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
            raise CorruptFileError(f"{path} is corrupt or unreadable: {err}") from None
        return stamp_load_id(self, metadata)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner reading non-tensor items (optimizer hyper-parameters) weights-only. DCP
    unpickles an item without restriction, so it is handed the item as read weights-only and
    written again: plain values only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        item = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            refusal = weights_only_refusal(err)
            if refusal is None:
                raise CorruptFileError(
                    f"item {item} of a DCP checkpoint is corrupt: {weights_only_damage(err)}"
                ) from None
            raise UnsafeCheckpointError(
                f"refusing item {item} of a DCP checkpoint: it needs arbitrary code to "
                f"unpickle ({refusal}), which is never executed here"
            ) from None
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)

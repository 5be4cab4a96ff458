"""torch.distributed.checkpoint (DCP) I/O for the native backends and the offline reader:
files written through the checkpoint's recorder (size and SHA-256 on the way out), and read
without executing code: DCP itself unpickles `.metadata` with plain `pickle` and its non-tensor
items (optimizer hyper-parameters) with `weights_only=False`; here the metadata goes through
an allowlist of DCP's own classes and the items through `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import FileSystem

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
        self.fs = RecordingFileSystem(recorder)


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name)
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
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing {self.path}: its pickle asks for {module}.{name}, which is not a DCP "
            f"metadata class; it is never executed here"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with `.metadata` unpickled through an allowlist."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read()), str(path)).load()
        except UnsafeCheckpointError:
            raise
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
            raise CorruptFileError(f"{path} is corrupt or unreadable: {err}") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner reading non-tensor items (optimizer hyper-parameters) weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"refusing item {read_item.dest_index.fqn} of a DCP checkpoint: "
                f"{str(err).splitlines()[0]}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

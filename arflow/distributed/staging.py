"""Copies of training state in host memory, taken at a step boundary so that a checkpoint can be
written in the background while training goes on changing the originals.

    stager = HostStager()
    copy = stager(state, "backend")   # every tensor of `state` copied into host buffers

A stager copies every tensor of a nested structure (dicts, lists, tuples) and keeps everything
else as it is (numbers, strings, small library objects that training does not change). Its host
buffers are kept from one save to the next (the same key and tensor layout reuse the same
buffer): on CUDA they are pinned, so the copies run asynchronously and finish at one
synchronisation, and neither pinned allocation nor first-touch page faults are paid per save.
Reusing them is safe because a save starts only after the previous one has been written.
A sharded DTensor keeps its mesh, placements and global shape: only its local shard is copied,
so a checkpoint library still writes it as the same shard of the same tensor.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


class HostStager:
    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pending = False

    def __call__(self, obj, key: str):
        """A copy of `obj` whose tensors live in this stager's host buffers for `key`."""
        self._pending = False
        out = self._copy(obj, (key,))
        if self._pending:
            torch.cuda.synchronize()  # every asynchronous device-to-host copy has landed
        return out

    def _copy(self, obj, path: tuple):
        if isinstance(obj, DTensor):
            return DTensor.from_local(
                self._tensor(obj.to_local(), path),
                obj.device_mesh,
                obj.placements,
                run_check=False,
                shape=obj.shape,
                stride=obj.stride(),
            )
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, dict):
            return type(obj)((k, self._copy(v, (*path, k))) for k, v in obj.items())
        if type(obj) in (list, tuple):  # not their subclasses (torch.Size, named tuples)
            return type(obj)(self._copy(v, (*path, i)) for i, v in enumerate(obj))
        return obj

    def _tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        t = t.detach()
        cuda = t.device.type == "cuda"
        host = self._buffers.get(path)
        if host is None or (host.shape, host.dtype, host.stride()) != (
            t.shape,
            t.dtype,
            t.stride(),
        ):
            host = torch.empty_like(t, device="cpu", pin_memory=cuda)
            self._buffers[path] = host
        host.copy_(t, non_blocking=cuda)
        self._pending |= cuda
        return host

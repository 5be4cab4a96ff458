"""The generated set in the ADM evaluation-suite layout: one `.npz` with arr_0 uint8 images
(N, H, W, 3) and arr_1 int64 labels (N,), readable by `np.load` and the ADM evaluator.

No rank ever holds the whole set (50k images at 256 px are 9.8 GB): rank 0 creates a
memory-mapped `.npy` next to the target, every rank writes its rows into it, and rank 0 then
stores that file into the zip uncompressed (as np.savez does), streaming from disk. The target
folder must therefore be on a filesystem all ranks share, as checkpoint folders are.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


class SampleNpzWriter:
    """Collective: every rank constructs it, writes its rows and calls close().

    path: target `.npz`; labels: (N,) labels of the whole set (known to every rank);
    image_shape: (C, H, W) of the images, C in {1, 3} (grayscale is stored as RGB).
    """

    def __init__(
        self,
        path: str | Path,
        labels: np.ndarray,
        image_shape: tuple[int, int, int],
        rank: int,
        world_size: int,
    ):
        self.path = Path(path)
        self.rank, self.world_size, self.labels = rank, world_size, labels
        self.partial = self.path.with_name(self.path.name + ".arr_0.npy.partial")
        _, h, w = image_shape
        shape = (len(labels), h, w, 3)
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(self.partial, "w+", np.uint8, shape)
            self.array.flush()
        _barrier(world_size)
        if rank != 0:
            if not self.partial.is_file():
                raise FileNotFoundError(
                    f"rank {rank} cannot see {self.partial}, created by rank 0: --save-npz must "
                    f"point into a folder shared by all ranks"
                )
            self.array = np.lib.format.open_memmap(self.partial, "r+")

    def write(self, indices: range, images: torch.Tensor) -> None:
        """indices: a contiguous range of global sample indices; images: (B, C, H, W) uint8."""
        rows = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()
        self.array[indices.start : indices.stop] = rows

    def close(self) -> None:
        """Flush every rank's rows, then rank 0 packs the `.npz` (written aside, then renamed)."""
        self.array.flush()
        del self.array
        _barrier(self.world_size)
        if self.rank == 0:
            staging = self.path.with_name(self.path.name + ".partial")
            with zipfile.ZipFile(staging, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(self.partial, arcname="arr_0.npy")
                labels = io.BytesIO()
                np.save(labels, self.labels.astype(np.int64))
                zf.writestr("arr_1.npy", labels.getvalue())
            os.replace(staging, self.path)
            self.partial.unlink()

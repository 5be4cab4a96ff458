"""Image sets to compute reference statistics from, as batches of uint8 (B, 3, H, W).

Sources: a folder of PNG/JPEG files (searched recursively, sorted), an ADM-layout `.npz`
(arr_0 uint8 (N, H, W, 3), e.g. written by `launchers/evaluate.py --save-npz`), or a shard set
of pixel images (see arflow.eval.shards). Each rank reads a disjoint part; the statistics are
sums, so the parts need no order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def center_crop_resize(image, size: int):
    """ADM's reference preprocessing (PIL image -> size x size RGB): halve with a box filter
    while the short side is >= 2 * size, resize bicubically so the short side is `size`, then
    crop the centre."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """PNG/JPEG files under `root` (recursive, sorted) as uint8 (3, H, W); resized and centre-
    cropped to `resolution` when given, else used as they are."""

    def __init__(self, root: str | Path, resolution: int | None = None):
        self.root, self.resolution = Path(root), resolution
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.files[i]) as image:
            image = (
                center_crop_resize(image, self.resolution)
                if self.resolution
                else image.convert("RGB")
            )
            array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), str(self.files[i])


def _stack_same_size(items: list[tuple[torch.Tensor, str]]) -> torch.Tensor:
    first, first_name = items[0]
    for image, name in items[1:]:
        if image.shape != first.shape:
            raise ValueError(
                f"images of different sizes in one set: {first_name} is {tuple(first.shape[1:])}, "
                f"{name} is {tuple(image.shape[1:])}; resize them first (tools/fid_reference.py "
                f"--resolution does ADM's centre crop)"
            )
    return torch.stack([image for image, _ in items])


def folder_batches(
    root: str | Path,
    batch_size: int,
    resolution: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[torch.Tensor]:
    """Rank r's files (every world_size-th from the r-th) in uint8 batches (B, 3, H, W)."""
    folder = ImageFolder(root, resolution)
    part = torch.utils.data.Subset(folder, range(rank, len(folder), world_size))
    yield from DataLoader(
        part, batch_size=batch_size, num_workers=num_workers, collate_fn=_stack_same_size
    )


def npz_batches(
    path: str | Path, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Rank r's contiguous rows of arr_0 (N, H, W, 3) uint8 in batches (B, 3, H, W), read
    straight from the zip member so a 50k-image file never sits in memory whole."""
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path} has no arr_0 (ADM sample layout: arr_0 uint8 (N, H, W, 3))")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
                raise ValueError(
                    f"{path}: arr_0 must be C-ordered uint8 (N, H, W, 3), got {dtype} {shape}"
                )
            n, row = shape[0], int(np.prod(shape[1:]))
            start, stop = rank * n // world_size, (rank + 1) * n // world_size
            f.seek(f.tell() + start * row)
            for first in range(start, stop, batch_size):
                count = min(batch_size, stop - first)
                rows = np.frombuffer(f.read(count * row), np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(rows.copy()).permute(0, 3, 1, 2)


def image_batches(
    src: str | Path,
    batch_size: int,
    resolution: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of rank r's part of `src`: a folder, an ADM `.npz`, or a shard
    set (directory with manifest.json, or an fsspec URL such as s3://bucket/shards)."""
    path = Path(str(src))
    if path.is_dir() and not (path / "manifest.json").is_file():
        yield from folder_batches(path, batch_size, resolution, rank, world_size, num_workers)
    elif path.suffix == ".npz" and path.is_file():
        if resolution:
            raise ValueError("--resolution applies to image folders and shards, not to .npz sets")
        yield from npz_batches(path, batch_size, rank, world_size)
    else:
        from .shards import shard_batches

        yield from shard_batches(str(src), batch_size, resolution, rank, world_size)

"""Existing image sets for FID statistics, as batches of uint8 (B, 3, H, W), and their
Inception statistics (mu, sigma): the reference of a dataset, or either side of an FID between
two image sets.

Sources: a folder of image files (searched recursively, sorted), an ADM-layout `.npz`
(arr_0 uint8 (N, H, W, 3), e.g. written by `launchers/evaluate.py --save-npz`), or a shard set
of pixel images (tools/make_shards.py --encode pixels; local or fsspec such as s3://). Each rank
reads a disjoint part; the statistics are sums, so the parts need no order.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.errors import BadSampleWarning
from ..data.manifest import load_manifest
from ..data.shards import iter_shard
from ..data.writing.images import IMAGE_EXTENSIONS, list_images, read_image
from .inception import InceptionFeatures
from .statistics import FeatureStats, load_reference


class ImageFolder(Dataset):
    """Image files under `root` as uint8 (3, H, W), read exactly as training shards are made
    (arflow.data.writing.images: recursive, sorted, one extension list, ADM's centre crop to
    `resolution` when given, else the images as they are)."""

    def __init__(self, root: str | Path, resolution: int | None = None):
        self.root, self.resolution = Path(root), resolution
        self.files = [self.root / name for name in list_images(str(self.root))]
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image = read_image(str(self.files[i]), self.resolution)
        return torch.from_numpy(image), str(self.files[i])


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


def source_kind(src: str | Path) -> str:
    """What `src` is: "stats" (a `.npz` with mu and sigma: ours or an ADM reference batch),
    "npz" (ADM samples, arr_0), "folder" (images) or "shards" (a directory with manifest.json,
    or a URL). Checked before any network or Inception work: a local path that does not exist
    raises FileNotFoundError naming it."""
    text = str(src)
    if "://" in text:
        return "shards"
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected a statistics .npz, an ADM sample .npz, an image "
            f"folder or a shard set)"
        )
    if path.is_dir():
        return "shards" if (path / "manifest.json").is_file() else "folder"
    if path.name == "manifest.json":
        return "shards"
    if path.suffix == ".npz":
        with np.load(path) as data:
            keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            return "stats"
        if "arr_0" in keys:
            return "npz"
        raise ValueError(
            f"{path} holds neither statistics (mu, sigma) nor ADM samples (arr_0); its keys: "
            f"{', '.join(sorted(keys)) or 'none'}"
        )
    raise ValueError(f"{path} is not an image set: expected a .npz, an image folder or a shard set")


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
    kind = source_kind(src)
    if kind == "folder":
        yield from folder_batches(src, batch_size, resolution, rank, world_size, num_workers)
    elif kind in ("npz", "stats"):
        if resolution:
            raise ValueError("--resolution applies to image folders and shards, not to .npz sets")
        yield from npz_batches(src, batch_size, rank, world_size)
    else:
        yield from shard_batches(str(src), batch_size, resolution, rank, world_size)


def shard_batches(
    url: str,
    batch_size: int,
    resolution: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    storage_options: dict | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the images in rank r's shards (every world_size-th shard
    from the r-th). url: the shard set's root or manifest.json, local or fsspec (s3://...).
    Unreadable samples are reported as BadSampleWarnings and left out."""
    manifest = load_manifest(url, storage_options)
    if manifest.encoding != "pixels" or manifest.stored_dtype != "uint8":
        raise ValueError(
            f"{url} stores {manifest.encoding} ({manifest.stored_dtype}); reference statistics "
            f"need images: use a pixel shard set or the image folder the shards were made from"
        )
    size = manifest.sample_shape[-1]
    if resolution and resolution != size:
        raise ValueError(
            f"{url} stores {size}x{size} images; --resolution {resolution} would resample them: "
            f"make shards at {resolution} or use the image folder"
        )

    def on_bad(message: str, count: int) -> None:
        warnings.warn(BadSampleWarning(f"{message} (left out of the statistics)"), stacklevel=2)

    batch = []
    for shard in manifest.shards[rank::world_size]:
        for _, image in iter_shard(
            shard,
            dtype=manifest.stored_dtype,
            shape=manifest.stored_shape,
            on_bad=on_bad,
            storage_options=storage_options,
        ):
            if image is None:
                continue
            batch.append(image)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch))
                batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch))


def image_set_stats(
    src: str | Path,
    inception: InceptionFeatures,
    batch_size: int = 50,
    resolution: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureStats:
    """Mean and covariance sums of the pool features of every image of `src` (see
    image_batches). Collective when torch.distributed is initialised: each
    rank reads its part and one all-reduce combines them; the result is the same on all ranks."""
    initialised = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    stats = FeatureStats(device=inception.device)
    batches = image_batches(src, batch_size, resolution, rank, world_size, num_workers)
    with tqdm(disable=not (progress and rank == 0), unit="img", desc=f"features of {src}") as bar:
        for images in batches:
            pool, _ = inception(images)
            stats.update(pool)
            bar.update(images.shape[0] * world_size)  # the other ranks keep the same pace
    stats.all_reduce()
    if stats.count.item() < 2:
        raise ValueError(
            f"{src} holds {int(stats.count.item())} image(s); FID statistics need >= 2"
        )
    return stats


def stats_of(
    sources: list[str | Path], inception_weights: str | None, device: torch.device | str, **kwargs
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mu, sigma) of each source: read from a statistics `.npz`, or computed from an image set
    (folder, ADM sample `.npz`, shards; kwargs as image_set_stats). Every source is checked
    first, and the Inception network is loaded once, only when an image set needs it."""
    kinds = [source_kind(src) for src in sources]
    inception = None
    if any(kind != "stats" for kind in kinds):
        inception = InceptionFeatures(inception_weights, device)
    return [
        load_reference(src)
        if kind == "stats"
        else image_set_stats(src, inception, **kwargs).mean_cov()
        for src, kind in zip(sources, kinds)
    ]

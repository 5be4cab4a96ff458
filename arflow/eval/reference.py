"""Inception statistics (mu, sigma) of an existing image set: the FID reference of a dataset,
or either side of an FID between two image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .images import image_batches
from .inception import InceptionFeatures
from .stats import FeatureStats, load_reference


def image_set_stats(
    src: str | Path,
    inception: InceptionFeatures,
    batch_size: int = 50,
    resolution: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureStats:
    """Mean and covariance sums of the pool features of every image of `src` (see
    arflow.eval.images.image_batches). Collective when torch.distributed is initialised: each
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


def stats_file_or_images(
    path: str | Path, inception_weights: str | None, device: torch.device | str, **kwargs
):
    """(mu, sigma) of `path`: read from a statistics `.npz` (keys mu, sigma), or computed from
    an image set (folder, ADM sample `.npz`, shards)."""
    if str(path).endswith(".npz") and Path(path).is_file():
        with np.load(path) as data:
            has_stats = {"mu", "sigma"} <= set(data.files)
        if has_stats:
            return load_reference(path)
    inception = InceptionFeatures(inception_weights, device)
    return image_set_stats(path, inception, **kwargs).mean_cov()  # path may be an s3:// URL

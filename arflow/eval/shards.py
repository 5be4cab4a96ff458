"""Images of a pixel shard set (tools/make_shards.py --encode pixels) for reference statistics."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..data.errors import BadSampleWarning
from ..data.manifest import load_manifest
from ..data.shards import iter_shard


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

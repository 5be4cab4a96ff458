"""A shard set of random SD-VAE-shaped latent moments, for benchmarks and tests without a VAE."""

from __future__ import annotations

import json

import numpy as np

from arflow.data.manifest import MANIFEST_NAME, VERSION, Manifest, ShardInfo
from arflow.data.shards import sample_key, write_shard
from arflow.storage import join_url, write_atomic


def write_synthetic_latents(
    out: str,
    *,
    classes: int,
    per_class: int,
    per_shard: int,
    side: int = 32,
    storage_options: dict | None = None,
    seed: int = 0,
) -> Manifest:
    """Write ``classes`` x ``per_class`` samples of float32 moments (2, 8, side, side) (image and
    flip; [mean (4 channels); logvar (4)]) to ``out``, as make_shards --encode vae lays them out:
    what ARFlow-XL/2 trains on at 256 px when side = 32 (64 KiB per sample)."""
    rng = np.random.default_rng(seed)
    shards = []
    for c in range(classes):
        for j, first in enumerate(range(0, per_class, per_shard)):
            count = min(per_shard, per_class - first)
            moments = rng.standard_normal((count, 2, 8, side, side), dtype=np.float32)
            moments[:, :, 4:] = moments[:, :, 4:] / 2 - 6  # logvar around -6, as SD-VAE's
            path = f"shards/c{c:05d}_{j:04d}.tar"
            keys = [sample_key(c, first + i) for i in range(count)]
            url = join_url(out, path)
            size, sha = write_shard(url, c, list(moments), keys, storage_options)
            shards.append(ShardInfo(url, path, c, count, size, sha))
    manifest = Manifest(
        url=join_url(out, MANIFEST_NAME),
        version=VERSION,
        class_names=[f"class{c}" for c in range(classes)],
        counts=[per_class] * classes,
        sample_shape=(4, side, side),
        encoding="vae",
        stored_dtype="float32",
        stored_shape=(2, 8, side, side),
        scaling_factor=0.18215,
        shards=shards,
        image_size=8 * side,
        source="synthetic",
    )
    write_atomic(manifest.url, json.dumps(manifest.to_dict()).encode(), storage_options)
    return manifest

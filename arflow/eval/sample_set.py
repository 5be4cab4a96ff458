"""The generated evaluation set: which samples a rank draws, how they become uint8 images, and
the ADM `.npz` they can be written to.

Sample i of the set [0, N) has the seed sample_seed(seed, i) and the label sample_labels(...)[i]
("balanced": i % num_classes; "random": uniform, from a generator keyed by (seed, i)). The
sampler makes a sample depend only on its label, its seed and the weights, so the set is the same
for every world size and batch size.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import SamplerConfig
from ..flow.samplers import sample
from ..models.vae import VAE
from ..utils.images import to_uint8

_LABEL_STREAM = 1  # spawn key that separates the label generator from the noise seed


def rank_range(num_samples: int, rank: int, world_size: int) -> range:
    """Rank r's contiguous share of [0, N): [r N // W, (r + 1) N // W); sizes differ by <= 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def sample_labels(indices: Sequence[int], num_classes: int, mode: str, seed: int) -> np.ndarray:
    """(len(indices),) int64 labels of the given samples of the set.

    "balanced": round-robin classes, so every contiguous block of the set is class-balanced;
    "random": uniform over the classes, drawn per sample from a generator keyed by (seed, index)
    (the public release draws its evaluation labels uniformly at random).
    """
    if mode == "balanced":
        return np.asarray(indices, dtype=np.int64) % num_classes
    if mode == "random":
        return np.array(
            [
                np.random.default_rng(
                    np.random.SeedSequence([seed, i], spawn_key=(_LABEL_STREAM,))
                ).integers(num_classes)
                for i in indices
            ],
            dtype=np.int64,
        )
    raise ValueError(f"eval.labels must be 'balanced' or 'random', got {mode!r}")


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of the set drawn with base `seed`. Hashing (rather than
    seed + index) keeps the sets of nearby base seeds from sharing samples, and 63 bits make
    a repeated seed among 50k samples practically impossible (32 bits would not)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class ImageGenerator:
    """Draws samples of the set as uint8 images (B, C, H, W), C = 3, or 1 for grayscale pixel
    models. The model samples on its own device.

    labels, seed: as EvalConfig.labels and EvalConfig.seed.
    vae: decodes the samples of a latent model (required then); pixel models need none.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler: SamplerConfig,
        seed: int,
        labels: str = "balanced",
        vae: VAE | None = None,
    ):
        self.model, self.sampler, self.seed, self.labels, self.vae = (
            model,
            sampler,
            seed,
            labels,
            vae,
        )
        c = model.in_channels
        if vae is None and c not in (1, 3):
            raise ValueError(
                f"the model has in_channels={c}, not pixels (1 or 3 channels): set eval.vae to "
                f"the local AutoencoderKL folder its latents come from"
            )
        if vae is not None and c != vae.latent_channels:
            raise ValueError(
                f"the model has in_channels={c} but the VAE at {vae.path} has "
                f"latent_channels={vae.latent_channels}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generated images."""
        size = self.model.input_size
        if self.vae is None:
            return self.model.in_channels, size, size
        return self.vae.image_shape(size)

    def labels_of(self, indices: Sequence[int]) -> np.ndarray:
        return sample_labels(indices, self.model.num_classes, self.labels, self.seed)

    @torch.no_grad()
    def __call__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: B global sample indices -> (labels (B,) long, images (B, C, H, W) uint8)."""
        labels = torch.from_numpy(self.labels_of(indices))
        seeds = [sample_seed(self.seed, i) for i in indices]
        x = sample(self.model, labels, seeds, self.sampler)
        if self.vae is not None:
            x = self.vae.decode(x)
        return labels, to_uint8(x)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


class SampleNpzWriter:
    """The set in the ADM evaluation-suite layout: one `.npz` with arr_0 uint8 images
    (N, H, W, 3) and arr_1 int64 labels (N,), readable by `np.load` and the ADM evaluator.

    No rank ever holds the whole set (50k images at 256 px are 9.8 GB): rank 0 creates a
    memory-mapped `.npy` next to the target, every rank writes its rows into it, and rank 0 then
    stores that file into the zip uncompressed (as np.savez does), streaming from disk. The
    target folder must therefore be on a filesystem all ranks share, as checkpoint folders are.

    Collective: every rank constructs it, writes its rows and calls close().
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

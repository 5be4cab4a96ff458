"""The evaluation sample set: which samples a rank draws and how they become uint8 images.

Sample i of the set [0, N) has class i % num_classes (class-balanced, N / num_classes each
when divisible) and seed sample_seed(seed, i). The sampler makes a sample depend only on its
label, its seed and the weights, so the set is the same for every world size and batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..flow.samplers import SamplerConfig, sample


def rank_range(num_samples: int, rank: int, world_size: int) -> range:
    """Rank r's contiguous share of [0, N): [r N // W, (r + 1) N // W); sizes differ by <= 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def sample_label(index: int, num_classes: int) -> int:
    """Round-robin classes: every contiguous block of the set is class-balanced too."""
    return index % num_classes


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of the set drawn with base `seed`. Hashing (rather than
    seed + index) keeps the sets of nearby base seeds from sharing samples, and 63 bits make
    a repeated seed among 50k samples practically impossible (32 bits would not)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) float -> uint8. The DiT/SiT evaluation's quantisation
    (clamp(127.5 x + 128) then truncate, i.e. round to nearest), so FIDs are comparable."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)


class ImageGenerator:
    """Draws samples of the set as uint8 images (B, C, H, W), C = 3, or 1 for grayscale pixel
    models. The model samples on its own device; `device` holds the VAE.

    vae: a local diffusers AutoencoderKL folder, required when the model works on latents;
    latents are decoded as vae.decode(x / latent_scale).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler: SamplerConfig,
        seed: int,
        device: torch.device | str,
        vae: str | None = None,
        latent_scale: float = 0.18215,
    ):
        self.model, self.sampler, self.seed = model, sampler, seed
        self.latent_scale = latent_scale
        self.vae = None if vae is None else load_vae(vae, device)
        c = model.in_channels
        if self.vae is None and c not in (1, 3):
            raise ValueError(
                f"the model has in_channels={c}, not pixels (1 or 3 channels): set eval.vae to "
                f"the local AutoencoderKL folder its latents come from"
            )
        if self.vae is not None and c != self.vae.config.latent_channels:
            raise ValueError(
                f"the model has in_channels={c} but the VAE at {vae} has "
                f"latent_channels={self.vae.config.latent_channels}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generated images."""
        size = self.model.input_size
        if self.vae is None:
            return self.model.in_channels, size, size
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.out_channels, size * scale, size * scale

    @torch.no_grad()
    def __call__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: B global sample indices -> (labels (B,) long, images (B, C, H, W) uint8)."""
        labels = torch.tensor(
            [sample_label(i, self.model.num_classes) for i in indices], dtype=torch.long
        )
        seeds = [sample_seed(self.seed, i) for i in indices]
        x = sample(self.model, labels, seeds, self.sampler)
        if self.vae is not None:
            latents = x.to(self.vae.device, self.vae.dtype) / self.latent_scale
            x = self.vae.decode(latents).sample.float()
        return labels, to_uint8(x)


def load_vae(path: str, device: torch.device | str):
    """diffusers AutoencoderKL from a local folder, in eval mode on `device`."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(
            "eval.vae is set but diffusers is not installed: pip install 'arflow[vae]'"
        ) from err
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load a diffusers AutoencoderKL from eval.vae={path!r}: {err}"
        ) from err
    return vae.to(device).eval().requires_grad_(False)

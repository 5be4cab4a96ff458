"""Linear-interpolant flow matching over sequences of images.

Convention (SiT's): t = 0 is pure noise x0, t = 1 is data x1, x_t = t x1 + (1 - t) x0, and the
model regresses the velocity x1 - x0. Each training sequence of S images gets S independent noise
levels drawn U(0, 1) and sorted ascending, so noisier images come first: through the causal
state every image reads only noisier images, as it will at sampling time, where the earlier
autoregressive steps are the earlier (lower) times.
"""

from __future__ import annotations

import torch
from torch import nn


def sample_noise_levels(
    batch: int, num_images: int, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, S) noise levels, i.i.d. U(0, 1) and sorted ascending along S (noisier first)."""
    t = torch.rand(batch, num_images, device=device, generator=generator)
    return t.sort(dim=1).values


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x1 (data), x0 (noise): (B, S, C, H, W); t: (B, S) -> x_t = t x1 + (1 - t) x0."""
    t = t[..., None, None, None].to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """d x_t / dt of the linear interpolant: x1 - x0."""
    return x1 - x0


def training_loss(
    model: nn.Module,
    x1: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared velocity error over the whole sequence.

    x1: (B, S, C, H, W) clean images of one class per row; y: (B,) labels -> scalar loss.
    Randomness (noise levels, then noise) comes from `generator`, or from the global generator
    of x1's device when None.
    """
    if x1.ndim != 5:
        raise ValueError(f"x1 must be (B, S, C, H, W), got shape {tuple(x1.shape)}")
    B, S = x1.shape[:2]
    t = sample_noise_levels(B, S, device=x1.device, generator=generator)
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    prediction = model(interpolate(x1, x0, t), t, y)
    return (prediction.float() - velocity_target(x1, x0).float()).pow(2).mean()

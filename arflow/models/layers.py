"""Embeddings and small layers shared by the ARFlow backbone.

Parameter names follow DiT/SiT (and hence the public ARFlow release): `proj`, `mlp.0`, `mlp.2`,
`embedding_table`, `linear`, `adaLN_modulation.1`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (..., N, D); shift, scale: (..., 1, D) broadcast over tokens."""
    return x * (1 + scale) + shift


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, without affine parameters; statistics in fp32 for
    low-precision inputs, output in x's dtype. PyTorch's fused kernel: one pass over x forward
    and backward where the written-out formula takes several."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions, (grid_size**2, embed_dim), tokens in row-major order.

    The first half of the channels encodes the column, the second half the row; each half is
    [sin, cos] over frequencies 1 / 10000**(i / (D/4)), as in DiT/SiT, so a released pos_embed
    and this one agree.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos positions need a hidden size divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> tokens (B, N, D) with N = (H/p)(W/p), by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Noise levels t (...,) in [0, 1] -> (..., D): sinusoidal features then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t (...,) -> (..., dim) = [cos(t f), sin(t f)] with f = max_period**(-i/half)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[..., None] * freqs
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[..., :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_features(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row `num_classes` is the null class used for CFG.

    In training mode labels are replaced by the null class with probability `dropout_prob`
    (drawn from torch's global generator, so a seeded run is reproducible).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        rows = num_classes + int(dropout_prob > 0)
        # Values come from ARFlow.initialize_weights (normal, std 0.02, as DiT); passing the
        # table skips nn.Embedding's own normal fill, which on the meta device would import
        # seconds' worth of decompositions.
        self.embedding_table = nn.Embedding(
            rows, hidden_size, _weight=torch.empty(rows, hidden_size)
        )
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """Tokens (..., N, D) -> (..., N, p*p*C_out): LayerNorm, adaLN modulation, linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (..., N, D), c: (..., D)."""
        shift, scale = self.adaLN_modulation(c).unsqueeze(-2).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

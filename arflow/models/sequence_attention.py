"""What the attentions over a sequence of images share: projections in, gated output out.

Both attentions of the backbone (`hybrid`: softmax inside an image, a gated linear state across
images; `causal_softmax`: one softmax over all tokens of the images <= s) read the modulated
tokens h (B, S, N, D) of S images of N tokens through the same parameters, named as in the
public ARFlow release:

    q, k, v = RMSNorm_D(h W_q), RMSNorm_D(h W_k), RMSNorm_D(h W_v)   statistics over all D
              channels of a token, then the split into H heads of size d (no affine, eps 1e-6)
    out     = W_out( silu(h W_g) * RMSNorm_d(O) )                     O: the heads' mix, the
              output norm per head

The norm over the full width is what the release does (its norms are built with the head size
as nominal size but applied before the split, and average over the last axis); its weights were
trained that way, and per-head statistics give other outputs.

Each subclass computes O its own way and keeps an explicit state between calls. Their test
references are free functions of `arflow.models.naive`, which transcribe the same formulas
again straight from the weights, so that the tests compare two derivations rather than one code
path twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import rms_norm

FORMS = ("parallel", "recurrent")


class SequenceAttention(nn.Module):
    """Base of the attentions over (B, S, N, D): q_proj, k_proj, v_proj, g_proj and out_proj
    (D -> D, no bias), the full-width q/k/v norm and the gated, per-head-normalised output."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    @staticmethod
    def check_form(form: str, images: int) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if form == "recurrent" and images != 1:
            raise ValueError(f"the recurrent form takes one image per call, got S={images}")

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: (B, S, N, D) -> q, k, v: (B, S, H, N, d) (views), normalised over the full width D
        before the split into heads; k not yet scaled by 1/sqrt(d)."""
        # Each projection runs through its own module (never by reading .weight here): sharding
        # engines such as ZeRO-3 gather a module's parameters only around its own forward.
        return tuple(
            rms_norm(proj(h)).unflatten(-1, (self.num_heads, -1)).transpose(2, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def gated_output(self, h: torch.Tensor, *mixed: torch.Tensor) -> torch.Tensor:
        """h: (B, S, N, D) the modulated tokens; mixed: the heads' mix O (B, S, H, N, d), any
        float dtype and layout, or several terms that sum to it -> out_proj(silu(h W_g) *
        RMSNorm_d(O)) (B, S, N, D)."""
        gate = self.g_proj(h)
        total = sum(mixed[1:], mixed[0])
        normed = rms_norm(total).transpose(2, 3).flatten(-2).to(gate.dtype)
        return self.out_proj(F.silu(gate) * normed)

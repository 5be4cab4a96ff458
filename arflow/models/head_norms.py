"""The attentions' two normalisations with their layout changes fused, for eager mode.

Both attentions normalise around the split into heads: q, k and v over the full width D of a
token, then reordered head-major for the attention kernels; the heads' mix over each head's d
channels, then gated and reordered token-major for the output projection. Written as plain
tensor ops, each is four to six passes over a (B, S, N, D) tensor forward and more backward,
plus copies where a matmul meets a transposed view. The autograd Functions here do each in one
reduction and one or two writes per direction, put the result straight into the layout its
consumer reads, and hand gradients back in the layout the projections' backward reads.

Under torch.compile the plain formulas (`plain_*`) run instead: the compiler fuses them itself,
and the formulas are what the Functions must equal (the model tests compare the two). In eager
mode the Functions take about 6% off a block's forward and backward on a CPU at ARFlow-B/2
shapes (`benchmarks/attention.py --norms`).

Statistics are fp32 whatever the input dtype; outputs keep the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..internals.torch import silu_backward_
from .layers import rms_norm

EPS = 1e-6


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def _empty(shape, memory_order, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of logical `shape` whose memory runs in `memory_order`."""
    physical = [shape[i] for i in memory_order]
    out = torch.empty(physical, dtype=like.dtype, device=like.device)
    return out.permute(_inverse(memory_order))


def _inv_rms(x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(mean of x^2 over the last dim + eps), fp32, keepdim: one read of x."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return norm.square_().div_(x.shape[-1]).add_(EPS).rsqrt_()


class _NormSplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, heads, memory_order):
        B, S, N, D = x.shape
        inv = _inv_rms(x)  # (B, S, N, 1)
        y = _empty((B, S, heads, N, D // heads), memory_order, x)
        torch.mul(x.unflatten(-1, (heads, -1)).transpose(2, 3), inv[:, :, None], out=y)
        ctx.save_for_backward(y, inv)
        return y

    @staticmethod
    def backward(ctx, gy):
        # y = x * inv  =>  dx = inv * (g - y * mean_D(g * y)), per token over all D channels.
        y, inv = ctx.saved_tensors
        B, S, H, N, d = y.shape
        dot = torch.linalg.vecdot(gy.float(), y.float(), dim=-1).sum(2)  # (B, S, N)
        dx = torch.empty(B, S, N, H * d, dtype=torch.float32, device=y.device)
        heads = dx.view(B, S, N, H, d).transpose(2, 3)
        torch.addcmul(gy, y, dot.div_(H * d)[:, :, None, :, None], value=-1, out=heads)
        return dx.mul_(inv).to(y.dtype), None, None


def plain_norm_split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """norm_split_heads as plain tensor ops (a view of one normalised tensor)."""
    return rms_norm(x).unflatten(-1, (heads, -1)).transpose(2, 3)


def norm_split_heads(x: torch.Tensor, heads: int, memory_order=(0, 1, 2, 3, 4)) -> torch.Tensor:
    """x: (B, S, N, D) -> RMSNorm over D, split into heads: (B, S, H, N, d), its memory laid
    out in `memory_order` (of the output's dims; the default is contiguous head-major, (0, 2, 1,
    3, 4) puts all images of a head together)."""
    if torch.compiler.is_compiling():
        return plain_norm_split_heads(x, heads)
    return _NormSplitHeads.apply(x, heads, tuple(memory_order))


class _GatedHeadNorm(torch.autograd.Function):
    # Fresh full-size tensors are what this costs on a CPU (page faults on every new block),
    # so intermediates are updated in place wherever autograd does not need them.
    @staticmethod
    def forward(ctx, gate, *parts):
        # A fresh fp32 tensor (the inputs are saved by the attention kernels' backward).
        normed = torch.add(*parts) if len(parts) == 2 else parts[0].to(torch.float32, copy=True)
        normed = normed.float()
        B, S, H, N, d = normed.shape
        inv = _inv_rms(normed)  # (B, S, H, N, 1)
        normed.mul_(inv)
        silu = F.silu(gate)
        z = torch.empty_like(gate)
        heads = (B, S, N, H, d)
        torch.mul(normed, silu.view(heads).transpose(2, 3), out=z.view(heads).transpose(2, 3))
        ctx.save_for_backward(gate, silu, normed, inv)
        ctx.part_dtypes = [p.dtype for p in parts]
        return z

    @staticmethod
    def backward(ctx, gz):
        gate, silu, normed, inv = ctx.saved_tensors
        B, S, H, N, d = normed.shape
        heads = (B, S, N, H, d)
        g_heads = gz.view(heads).transpose(2, 3)
        d_gate = torch.empty_like(gate)
        torch.mul(g_heads, normed, out=d_gate.view(heads).transpose(2, 3))
        silu_backward_(d_gate, gate)
        # Head-major, as the attention kernels' backward wants its output gradient.
        d_mixed = torch.empty_like(normed, memory_format=torch.contiguous_format)
        torch.mul(g_heads, silu.view(heads).transpose(2, 3), out=d_mixed)
        # normed = mixed * inv  =>  d mixed = inv * (dn - normed * mean_d(dn * normed))
        dot = torch.linalg.vecdot(d_mixed, normed, dim=-1).div_(d)[..., None]
        d_mixed.addcmul_(normed, dot, value=-1).mul_(inv)
        return (d_gate, *(d_mixed.to(dtype) for dtype in ctx.part_dtypes))


def plain_gated_head_norm(gate: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
    """gated_head_norm as plain tensor ops."""
    mixed = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    normed = rms_norm(mixed).transpose(2, 3).flatten(-2).to(gate.dtype)
    return F.silu(gate) * normed


def gated_head_norm(gate: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
    """silu(gate) * RMSNorm_d(sum of parts), token-major.

    gate: (B, S, N, D); parts: one or two (B, S, H, N, d) in any memory layout, summed (the
    hybrid's intra and inter terms) -> (B, S, N, D) contiguous, gate's dtype.
    """
    if torch.compiler.is_compiling():
        return plain_gated_head_norm(gate, *parts)
    return _GatedHeadNorm.apply(gate, *parts)

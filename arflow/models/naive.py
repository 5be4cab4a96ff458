"""Naive references of the two attentions and of the backbone's forward, for tests only.

The math of hybrid_attention.py and causal_attention.py transcribed a second time: explicit
loops over images, heads and tokens, weights read straight from the modules' projections, and
norms written out here rather than taken from the fast code (which uses PyTorch's fused
RMSNorm). Sharing no code with the parallel and recurrent forms is the point: the tests hold
those forms to these functions over a grid of shapes and dtypes, so two derivations check each
other. Everything runs in fp32 with autocast off, whatever the input dtype; outputs come back
in the input's dtype, states in fp32. Slow by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .causal_attention import CausalSoftmaxAttention, KVCache
from .hybrid_attention import HybridAttention
from .layers import modulate


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, no affine."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T with `layer`'s weight in fp32 (the attentions' projections have no bias)."""
    return x @ layer.weight.float().T


def qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: (B, S, N, D) fp32 -> q, k, v (B, S, N, H, d): RMS statistics over all D channels of a
    token (the release's norm), then the split into heads; k not scaled."""
    B, S, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    return tuple(
        rms(linear(proj, h)).view(B, S, N, H, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )


def gated_output(attn: nn.Module, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """h: (B, N, D) one image's tokens; mixed: (B, N, H, d) its heads' mix -> out_proj(silu(h
    W_g) * RMSNorm_d(mixed)) (B, N, D), the norm per head."""
    gate = F.silu(linear(attn.g_proj, h))
    return linear(attn.out_proj, gate * rms(mixed).flatten(-2))


def hybrid_attention(
    attn: HybridAttention, h: torch.Tensor, c: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid attention of hybrid_attention.py's docstring, image by image, head by head,
    token by token. h: (B, S, N, D), c: (B, S, D), state: (B, H, d, d) or None (zeros)
    -> (out (B, S, N, D) in h's dtype, state after the last image (B, H, d, d) fp32)."""
    B, S, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    out_dtype = h.dtype
    with torch.autocast(h.device.type, enabled=False):
        h, c = h.float(), c.float()
        if state is None:
            state = h.new_zeros(B, H, d, d)
        q, k, v = qkv(attn, h)  # (B, S, N, H, d)
        k = k / d**0.5
        logits = linear(attn.gt_proj, h + c[:, :, None])
        gamma = F.logsigmoid(logits) / attn.gate_logit_normalizer  # (B, S, N, H)
        heads = list(state.float().unbind(1))  # H_s per head, (B, d, d)
        images = []
        for s in range(S):
            mixed = h.new_zeros(B, N, H, d)
            for head in range(H):
                qs, ks, vs = q[:, s, :, head], k[:, s, :, head], v[:, s, :, head]  # (B, N, d)
                intra = torch.softmax(qs @ ks.transpose(1, 2), dim=-1) @ vs
                running = h.new_zeros(B)
                for i in range(N):
                    running = running + gamma[:, s, i, head]
                    inter = (qs[:, i] * running.exp()[:, None])[:, None] @ heads[head]
                    mixed[:, i, head] = intra[:, i] + inter[:, 0]
                lam = gamma[:, s, :, head].mean(dim=1).exp()
                heads[head] = lam[:, None, None] * heads[head] + ks.transpose(1, 2) @ vs
            images.append(gated_output(attn, h[:, s], mixed))
    return torch.stack(images, dim=1).to(out_dtype), torch.stack(heads, dim=1)


def causal_softmax_attention(
    attn: CausalSoftmaxAttention, h: torch.Tensor, cache: KVCache | None = None
) -> tuple[torch.Tensor, KVCache]:
    """The block-causal softmax of causal_attention.py's docstring: for each image and head,
    one softmax over the keys of that image and every earlier one (and the cache), gathered in
    a growing list rather than masked. h: (B, S, N, D), cache: k, v (B, H, L, d) or None
    -> (out (B, S, N, D) in h's dtype, the cache extended by the S images, fp32)."""
    B, S, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    out_dtype = h.dtype
    with torch.autocast(h.device.type, enabled=False):
        h = h.float()
        q, k, v = qkv(attn, h)  # (B, S, N, H, d)
        empty = h.new_zeros(B, 0, d)
        keys = [empty if cache is None else cache.k[:, head].float() for head in range(H)]
        values = [empty if cache is None else cache.v[:, head].float() for head in range(H)]
        images = []
        for s in range(S):
            mixed = h.new_zeros(B, N, H, d)
            for head in range(H):
                keys[head] = torch.cat([keys[head], k[:, s, :, head]], dim=1)  # (B, L, d)
                values[head] = torch.cat([values[head], v[:, s, :, head]], dim=1)
                logits = q[:, s, :, head] @ keys[head].transpose(1, 2) / d**0.5
                mixed[:, :, head] = torch.softmax(logits, dim=-1) @ values[head]
            images.append(gated_output(attn, h[:, s], mixed))
    cache = KVCache(torch.stack(keys, dim=1), torch.stack(values, dim=1))
    return torch.stack(images, dim=1).to(out_dtype), cache


def attention(attn: nn.Module, h: torch.Tensor, c: torch.Tensor, state=None):
    """The naive reference of either attention module, called as the module is: (h (B, S, N,
    D), c (B, S, D), state) -> (out, state after the last image)."""
    if isinstance(attn, HybridAttention):
        return hybrid_attention(attn, h, c, state)
    if isinstance(attn, CausalSoftmaxAttention):
        return causal_softmax_attention(attn, h, state)
    raise TypeError(f"no naive reference for {type(attn).__name__}")


def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ARFlow's velocity for a whole sequence with every block's attention replaced by its naive
    reference (embeddings, MLPs and the final layer are the model's own modules).
    x: (B, S, C, H, W), t: (B, S), y: (B,) -> (B, S, C, H, W)."""
    tokens, c = model.embed(x, t, y)
    for block in model.blocks:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)
        )
        mixed, _ = attention(block.attn, modulate(block.norm1(tokens), shift_msa, scale_msa), c)
        tokens = tokens + gate_msa * mixed
        tokens = tokens + gate_mlp * block.mlp(modulate(block.norm2(tokens), shift_mlp, scale_mlp))
    return model.unpatchify(model.final_layer(tokens, c))

"""Block-causal softmax attention across the images of a sequence: the paper's attention ablation.

Where the hybrid attention reads earlier images through a fixed-size gated linear state, this
one lets every token of image s attend, in one softmax, to every token of the images <= s
(bidirectional inside image s, causal across images). For one head of dimension d:

    K_{<=s}, V_{<=s} = keys and values of all tokens of images 0..s (and of a carried cache)
    O_s              = softmax(q_s K_{<=s}^T / sqrt(d)) V_{<=s}
    out              = W_out( silu(h W_g) * RMSNorm_d(O_s) )

Same projections as the hybrid otherwise (sequence_attention.py: q/k/v normalised over the full
width, the gate, the output projection), so a comparison changes only how images exchange
information. Two of the hybrid's pieces change:
- gt_proj is absent. Its only role is the decay of the linear state (how fast older images fade,
  and the in-image cumulative decay on the query); softmax weighs earlier images by content, so
  there is nothing left to gate, and a parameter outside the graph would get no gradient (which
  DDP refuses by default). The state dict is the hybrid's without `blocks.{i}.attn.gt_proj`.
- The per-head output norm and the silu gate stay. In the hybrid the norm also tames the
  unnormalised linear-attention sum; a softmax output is already a convex combination of the
  (normalised) values, but dropping the norm would change the block's output path as well and
  confound the ablation.

State and its cost: the sampler's state is a key/value cache (`KVCache`, (B, H, L, d) each,
L = N x images so far) instead of the hybrid's (B, H, d, d). Each step appends its image's N
keys and values, so memory and time per step grow linearly with the step index (the whole
sampling run is quadratic in the number of steps), where the hybrid's step costs the same at
step 1 and step 250. For ARFlow-XL/2 (depth 28, D = 1152 in 18 heads of 64, N = 256) after 250
SDE steps the cache holds 28 x 2 x 250 x 256 x 1152 values per sample, 8.3 GB in bf16, against
28 x 18 x 64 x 64 fp32 values (8.3 MB) for the hybrid state.

Forms: `parallel` (all S images, one SDPA call with a block-causal mask over S N tokens, plus
the cache as a prefix every query sees), `recurrent` (one image against the cache; the same
code with S = 1, where no mask is needed); `arflow.models.naive.causal_softmax_attention` is
the test reference (explicit loops).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .sequence_attention import SequenceAttention


class KVCache(NamedTuple):
    """Keys and values of every token seen so far, per head: k, v (B, H, L, d); k normalised
    but not scaled by 1/sqrt(d)."""

    k: torch.Tensor
    v: torch.Tensor


def check_cache(cache: KVCache, batch: int, heads: int, head_dim: int) -> None:
    k, v = cache
    if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"key/value cache has shape {tuple(k.shape)}, expected ({batch}, {heads}, L, "
            f"{head_dim}) (batch, heads, tokens, head_dim): was it built for another batch size?"
        )
    if v.shape != k.shape:
        raise ValueError(f"cache values {tuple(v.shape)} do not match its keys {tuple(k.shape)}")


def block_causal_mask(
    images: int, tokens: int, prefix: int, device: torch.device
) -> torch.Tensor | None:
    """(S N, prefix + S N) bool, True where a query may attend: every cached token, and every
    token of its own image or an earlier one. None for one image (nothing to mask)."""
    if images == 1:
        return None
    image = torch.arange(images, device=device).repeat_interleave(tokens)
    allowed = image[:, None] >= image[None, :]
    return torch.cat([allowed.new_ones(images * tokens, prefix), allowed], dim=1)


class CausalSoftmaxAttention(SequenceAttention):
    """Block-causal softmax attention over (B, S, N, D); parameters q_proj, k_proj, v_proj,
    g_proj, out_proj (D -> D, no bias)."""

    def forward(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        state: KVCache | None = None,
        form: str = "parallel",
    ) -> tuple[torch.Tensor, KVCache]:
        """h: (B, S, N, D) modulated tokens; c: (B, S, D) per-image conditioning (unused: no
        decay to condition, kept so both attentions share the block's call); state: the cache
        of earlier images, or None. Returns (out (B, S, N, D), the cache extended by these S
        images). `form="recurrent"` takes exactly one image (S = 1)."""
        B, S, N, _ = h.shape
        self.check_form(form, S)
        if state is not None:
            check_cache(state, B, self.num_heads, self.head_dim)
        qkv = self.project_qkv(h)
        # (B, H, S N, d): all images of a head together.
        q, k, v = (t.transpose(1, 2).reshape(B, self.num_heads, S * N, -1) for t in qkv)
        prefix = 0
        if state is not None:
            prefix = state.k.shape[2]
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        mask = block_causal_mask(S, N, prefix, h.device)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S N, d)
        mixed = mixed.unflatten(2, (S, N)).transpose(1, 2)  # (B, S, H, N, d)
        return self.gated_output(h, mixed), KVCache(k, v)

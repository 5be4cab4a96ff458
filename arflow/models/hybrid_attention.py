"""Hybrid attention: softmax attention inside each image, a gated linear recurrence across images.

For one head of dimension d and image s with N tokens (q, k, v are the projections of the
modulated tokens h, each RMS-normalised over the full hidden width D and then split into heads,
as the public release does; c_tok is the image's conditioning vector repeated over its tokens):

    k~_s          = k_s / sqrt(d)
    gamma_{s,i}   = logsigmoid((h_{s,i} + c_tok) W_gt) / 16               (<= 0, one per head)
    intra  O1_s   = softmax(q_s k~_s^T) v_s                                (bidirectional in s)
    state  H_0    = initial state (zeros)     H_{s+1} = lam_s H_s + k~_s^T v_s,
           lam_s  = exp(mean_i gamma_{s,i})
    inter  O2_s,i = (q_{s,i} * exp(sum_{j<=i} gamma_{s,j})) H_s
    out           = W_out( silu(h W_g) * RMSNorm_d(O1 + O2) )

Image s therefore reads images < s only through the (d x d) state H_s, and the state costs O(1)
memory in the number of images. Two forms compute the same function over one parameter set:

- `parallel`: all S images at once (training). The intra term folds images into the batch
  (flash-attn or SDPA, never an (S N)^2 matrix); the states H_s for every s come from one
  decay-weighted sum over the S per-image d x d products.
- `recurrent`: one image, state in -> (output, state out) (sampling).

`arflow.models.naive.hybrid_attention` is the test reference both are held to: the same math
with explicit loops over images, heads and tokens.

The inter-image term is computed in fp32 whatever the input dtype: the state sums many images'
products and is carried over hundreds of sampling steps. The projections and the gated output
are shared with the block-causal softmax ablation (sequence_attention.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .sequence_attention import SequenceAttention

try:  # optional GPU kernel; SDPA is the portable path
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None


def intra_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention inside each image, images folded into the batch.

    q, k, v: (B, S, H, N, d), unscaled -> (B, S, H, N, d).
    """
    B, S, H, N, d = q.shape
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*S, H, N, d)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn takes (batch, tokens, heads, d); these transposes are views.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.unflatten(0, (B, S))


def fp32_no_autocast(fn):
    """Run fn with autocast off and floating tensor arguments in fp32: the inter-image state sums
    many images' products and is carried over hundreds of sampling steps."""

    @functools.wraps(fn)
    def wrapper(*tensors: torch.Tensor):
        with torch.autocast(tensors[0].device.type, enabled=False):
            return fn(*(t.float() for t in tensors))

    return wrapper


@fp32_no_autocast
def inter_image_parallel(q, k, v, gamma, state):
    """Inter-image term for all S images and the state after the last one.

    q, k, v: (B, S, H, N, d) with k unscaled; gamma: (B, S, H, N); state: (B, H, d, d)
    -> (O2 (B, S, H, N, d), H_S (B, H, d, d)), fp32.
    """
    S, d = q.shape[1], q.shape[-1]
    kv = (k.transpose(-1, -2) @ v) * d**-0.5  # KV_s = k~_s^T v_s, (B, S, H, d, d)
    log_decay = gamma.mean(dim=-1)  # (B, S, H): log lam_s
    upto = log_decay.cumsum(dim=1)  # G_s = sum_{u<=s} log lam_u
    before = upto - log_decay  # G_{s-1}
    # H_s = exp(G_{s-1}) H_0 + sum_{r<s} exp(G_{s-1} - G_r) KV_r; every exponent is <= 0.
    earlier = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)  # [s, r]: r < s
    weights = before[:, :, None] - upto[:, None, :]  # (B, S_s, S_r, H)
    weights = weights.masked_fill(~earlier[None, :, :, None], float("-inf")).exp()
    states = torch.einsum("bsrh,brhde->bshde", weights, kv)
    states = states + before.exp()[..., None, None] * state[:, None]
    inter = (q * gamma.cumsum(dim=-1).exp()[..., None]) @ states
    final = log_decay[:, -1].exp()[..., None, None] * states[:, -1] + kv[:, -1]
    return inter, final


@fp32_no_autocast
def inter_image_step(q, k, v, gamma, state):
    """Inter-image term of one image and the state advanced past it.

    q, k, v: (B, H, N, d) with k unscaled; gamma: (B, H, N); state: (B, H, d, d)
    -> (O2 (B, H, N, d), new state (B, H, d, d)), fp32.
    """
    d = q.shape[-1]
    inter = (q * gamma.cumsum(dim=-1).exp()[..., None]) @ state
    decay = gamma.mean(dim=-1).exp()[..., None, None]  # (B, H, 1, 1)
    return inter, decay * state + (k.transpose(-1, -2) @ v) * d**-0.5


def check_state(state: torch.Tensor, batch: int, heads: int, head_dim: int) -> None:
    expected = (batch, heads, head_dim, head_dim)
    if tuple(state.shape) != expected:
        raise ValueError(
            f"linear-attention state has shape {tuple(state.shape)}, expected {expected} "
            f"(batch, heads, head_dim, head_dim): was it built for another batch size?"
        )


class HybridAttention(SequenceAttention):
    """Hybrid intra-image softmax / inter-image gated linear attention.

    Parameters (names of the public release): q_proj, k_proj, v_proj, g_proj, out_proj (D -> D)
    and gt_proj (D -> heads), all without bias.
    """

    def __init__(self, dim: int, num_heads: int, gate_logit_normalizer: float = 16.0):
        super().__init__(dim, num_heads)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gt_proj = nn.Linear(dim, num_heads, bias=False)

    def forward(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        state: torch.Tensor | None = None,
        form: str = "parallel",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, S, N, D) modulated tokens; c: (B, S, D) per-image conditioning;
        state: (B, H, d, d) fp32 state before the first image, or None for zeros.
        Returns (out (B, S, N, D), state after the last image (B, H, d, d) fp32).
        `form="recurrent"` takes exactly one image (S = 1).
        """
        B, S = h.shape[:2]
        self.check_form(form, S)
        if state is None:
            state = h.new_zeros(
                B, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float32
            )
        check_state(state, B, self.num_heads, self.head_dim)
        # (B, S, H, N, d) head-major: the layout the attention kernels and the d x d products
        # read without copies.
        q, k, v = self.project_qkv(h)
        gamma = self.decay_logits(h, c)
        intra = intra_image_attention(q, k, v)
        if form == "parallel":
            inter, state = inter_image_parallel(q, k, v, gamma, state)
        else:
            inter, state = inter_image_step(q[:, 0], k[:, 0], v[:, 0], gamma[:, 0], state)
            inter = inter[:, None]
        return self.gated_output(h, intra, inter), state

    def decay_logits(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h: (B, S, N, D), c: (B, S, D) -> gamma = logsigmoid((h + c) W_gt) / 16, (B, S, H, N)
        fp32, every value <= 0."""
        # (h + c) W_gt = h W_gt + c W_gt: the conditioning term is computed once per image.
        logits = self.gt_proj(h) + self.gt_proj(c)[:, :, None]
        return F.logsigmoid(logits.float()).transpose(2, 3) / self.gate_logit_normalizer

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
memory in the number of images. Three forms compute the same function over one parameter set:

- `parallel`: all S images at once (training). The intra term folds images into the batch
  (flash-attn or SDPA, never an (S N)^2 matrix); the states H_s for every s come from one
  decay-weighted sum over the S per-image d x d products.
- `recurrent`: one image, state in -> (output, state out) (sampling).
- `naive`: explicit loops over images, heads and tokens; a reference for tests only.

The inter-image term is computed in fp32 whatever the input dtype: the state sums many images'
products and is carried over hundreds of sampling steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import rms_norm

try:  # optional GPU kernel; SDPA is the portable path
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None

FORMS = ("parallel", "recurrent", "naive")


class Projections(NamedTuple):
    """Per-head projections of one or more images, head-major. Shapes with S images of N
    tokens and H heads: q, k, v: (B, S, H, N, d), each RMS-normalised over the full width D
    before the split into heads; k NOT yet scaled by 1/sqrt(d) (the scale is folded into the
    softmax and into the d x d state updates, which saves a pass over k); gamma: (B, S, H, N)
    fp32; gate: (B, S, N, D).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gamma: torch.Tensor
    gate: torch.Tensor


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


class HybridAttention(nn.Module):
    """Hybrid intra-image softmax / inter-image gated linear attention.

    Parameters (names of the public release): q_proj, k_proj, v_proj, g_proj, out_proj (D -> D)
    and gt_proj (D -> heads), all without bias.
    """

    def __init__(self, dim: int, num_heads: int, gate_logit_normalizer: float = 16.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.gt_proj = nn.Linear(dim, num_heads, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

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
        if state is None:
            state = h.new_zeros(
                B, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float32
            )
        check_state(state, B, self.num_heads, self.head_dim)
        if form == "naive":
            return self.naive(h, c, state)
        p = self.project(h, c)
        if form == "parallel":
            mixed, state = self.parallel(p, state)
        elif form == "recurrent":
            if S != 1:
                raise ValueError(f"the recurrent form takes one image per call, got S={S}")
            mixed, state = self.recurrent(p, state)
        else:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        return self.output(mixed, p.gate), state

    def project(self, h: torch.Tensor, c: torch.Tensor) -> Projections:
        """h: (B, S, N, D), c: (B, S, D) -> the per-head projections every form shares."""
        H, d = self.num_heads, self.head_dim
        # Each projection runs through its own module (never by reading .weight here): sharding
        # engines such as ZeRO-3 gather a module's parameters only around its own forward.
        # The norm spans all D channels jointly, before the split into heads: the release's
        # weights were trained that way, and per-head statistics would give other outputs.
        q, k, v = (
            rms_norm(proj(h)).unflatten(-1, (H, d)).transpose(2, 3)  # (B, S, H, N, d) views
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        # (h + c) W_gt = h W_gt + c W_gt: the conditioning term is computed once per image.
        logits = self.gt_proj(h) + self.gt_proj(c)[:, :, None]
        gamma = F.logsigmoid(logits.float()).transpose(2, 3) / self.gate_logit_normalizer
        return Projections(q, k, v, gamma, self.g_proj(h))

    def output(self, mixed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """mixed: O1 + O2 (B, S, H, N, d); gate: (B, S, N, D) -> (B, S, N, D)."""
        # Token-major before the norm: the attention kernels lay their output out that way,
        # so the transpose is usually free and the heads flatten without a copy.
        normed = rms_norm(mixed.transpose(2, 3)).to(gate.dtype).flatten(-2)
        return self.out_proj(F.silu(gate) * normed)

    def parallel(self, p: Projections, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All S images at once. Returns (O1 + O2 (B, S, H, N, d) fp32, final state)."""
        intra = intra_image_attention(p.q, p.k, p.v).float()
        inter, final = inter_image_parallel(p.q, p.k, p.v, p.gamma, state)
        return intra + inter, final

    def recurrent(self, p: Projections, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image (S = 1) against the state of all earlier images."""
        intra = intra_image_attention(p.q, p.k, p.v).float()
        inter, new_state = inter_image_step(p.q[:, 0], p.k[:, 0], p.v[:, 0], p.gamma[:, 0], state)
        return intra + inter[:, None], new_state

    def naive(
        self, h: torch.Tensor, c: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: the math of the module docstring transcribed with explicit loops over
        images, heads and tokens, straight from the weights and with its own norms (it shares
        no code with `project` / `output`, so the tests compare two derivations). fp32, slow,
        for tests only. h: (B, S, N, D), c: (B, S, D), state: (B, H, d, d)."""
        with torch.autocast(h.device.type, enabled=False):
            return self._naive(h.float(), c.float(), state.float(), h.dtype)

    def _naive(self, h, c, state, out_dtype):
        B, S, N, D = h.shape
        H, d, eps = self.num_heads, self.head_dim, 1e-6

        def rms(x):  # over the last axis, no affine
            return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

        def linear(module, x):
            return x @ module.weight.float().T

        # RMS statistics over all D channels of each token, then the split into heads.
        q, k, v = (
            rms(linear(m, h)).view(B, S, N, H, d) for m in (self.q_proj, self.k_proj, self.v_proj)
        )
        k = k / d**0.5
        gamma = F.logsigmoid(linear(self.gt_proj, h + c[:, :, None])) / self.gate_logit_normalizer
        gate = F.silu(linear(self.g_proj, h))
        heads = list(state.unbind(1))  # H_s per head, (B, d, d)
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
            images.append(linear(self.out_proj, gate[:, s] * rms(mixed).flatten(-2)))
        return torch.stack(images, dim=1).to(out_dtype), torch.stack(heads, dim=1)

"""Hybrid attention: the release's full-width q/k/v norm, causality across images, the fp32
inter-image term, input checks. The forms are held to the naive one over a grid of shapes and
dtypes in test_attention_forms.py."""

import pytest
import torch
from tiny_models import assert_rel_close, heads_scaled, randomize

from arflow.models import HybridAttention
from arflow.models.hybrid_attention import inter_image_parallel

B, S, N, D, H = 2, 5, 12, 32, 4


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, N, D, generator=gen)
    c = torch.randn(B, S, D, generator=gen)
    state = torch.randn(B, H, D // H, D // H, generator=gen) * 0.3
    return h, c, state


@pytest.fixture
def attn():
    return randomize(HybridAttention(D, H), seed=1, std=0.3)


def test_inter_image_path_is_not_trivial(attn):
    """Guard for the form tests: the state must change the output, else they prove little."""
    h, c, state = make_inputs()
    with_state, _ = attn(h, c, state)
    without, _ = attn(h, c, None)
    assert (with_state - without).abs().max() > 1e-2


def test_causal_across_images_bidirectional_inside(attn):
    h, c, _ = make_inputs()
    base, _ = attn(h, c)
    s = 2
    h2 = h.clone()
    h2[:, s] += torch.randn_like(h2[:, s])
    out, _ = attn(h2, c)
    assert torch.equal(out[:, :s], base[:, :s]), "an earlier image saw a later one"
    assert (out[:, s + 1 :] - base[:, s + 1 :]).abs().max() > 1e-3, "later images ignore image s"
    # Inside an image attention is bidirectional: the last token influences the first.
    h3 = h.clone()
    h3[:, s, -1] += 1.0
    out3, _ = attn(h3, c)
    assert (out3[:, s, 0] - base[:, s, 0]).abs().max() > 1e-4


def test_state_from_another_batch_is_refused(attn):
    h, c, state = make_inputs()
    with pytest.raises(ValueError, match="batch size"):
        attn(h[:1], c[:1], state)


def test_recurrent_form_takes_one_image(attn):
    h, c, _ = make_inputs()
    with pytest.raises(ValueError, match="one image"):
        attn(h, c, form="recurrent")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the bf16 fused path")
def test_bf16_cuda_close_to_fp32(attn):
    h, c, state = (t.cuda() for t in make_inputs())
    module = attn.cuda()
    ref, _ = module(h, c, state)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, final = module(h, c, state)
    assert final.dtype == torch.float32
    assert_rel_close(out.float(), ref, 3e-2)


def test_inter_image_term_runs_in_fp32_under_autocast():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, H, N, D // H, generator=gen).bfloat16() for _ in range(3))
    gamma = -torch.rand(B, S, H, N, generator=gen) / 16
    state = torch.randn(B, H, D // H, D // H, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inter, final = inter_image_parallel(q, k, v, gamma, state)
    assert inter.dtype == final.dtype == torch.float32
    ref_inter, ref_final = inter_image_parallel(q.float(), k.float(), v.float(), gamma, state)
    assert torch.equal(inter, ref_inter) and torch.equal(final, ref_final)


def reference_one_image(attn: HybridAttention, h, c, state, norm_width: int):
    """One image (S = 1) from the formula, with q/k/v RMS statistics taken over groups of
    `norm_width` channels: D is the release's (full width), D // H would be per head."""
    d = D // H

    def rms(x, width):
        g = x.unflatten(-1, (-1, width))
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2)

    def split(x):  # (B, N, D) -> (B, H, N, d)
        return x.unflatten(-1, (H, d)).transpose(1, 2)

    x, cond = h[:, 0], c[:, 0]
    q, k, v = (split(rms(p(x), norm_width)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    k = k / d**0.5
    gamma = torch.nn.functional.logsigmoid(attn.gt_proj(x + cond[:, None])) / 16  # (B, N, H)
    decay = gamma.transpose(1, 2).cumsum(-1).exp()[..., None]  # (B, H, N, 1)
    mixed = torch.softmax(q @ k.transpose(-1, -2), -1) @ v + (q * decay) @ state
    out = rms(mixed, d).transpose(1, 2).flatten(-2)  # output norm: per head
    return attn.out_proj(torch.nn.functional.silu(attn.g_proj(x)) * out)


def test_qkv_norm_spans_the_full_width(attn):
    """The release normalises q, k and v over all D channels before the split into heads; a
    per-head norm must fail this test (it differs by far more than the tolerance)."""
    module = heads_scaled(attn)
    h, c, state = make_inputs()
    with torch.no_grad():
        out, _ = module(h[:, :1], c[:, :1], state, form="recurrent")
        full = reference_one_image(module, h, c, state, norm_width=D)
        per_head = reference_one_image(module, h, c, state, norm_width=D // H)
    assert_rel_close(out[:, 0], full, 1e-5)
    assert (per_head - full).abs().max() / full.abs().max() > 1e-2, (
        "the test cannot tell the two norms apart"
    )

"""The three forms of hybrid attention agree, and the inter-image path is causal."""

import pytest
import torch

from arflow.models import HybridAttention
from arflow.models.hybrid_attention import inter_image_parallel

from tiny_models import randomize

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


def assert_rel_close(a, b, rel):
    err = (a - b).abs().max() / b.abs().max()
    assert err < rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_recurrent_naive_agree(attn, with_state):
    h, c, state = make_inputs()
    init = state if with_state else None
    out_p, final_p = attn(h, c, init, form="parallel")
    out_n, final_n = attn(h, c, init, form="naive")
    outs, carried = [], init
    for s in range(S):  # image by image through the recurrent form
        out, carried = attn(h[:, s : s + 1], c[:, s : s + 1], carried, form="recurrent")
        outs.append(out)
    out_r = torch.cat(outs, dim=1)
    assert_rel_close(out_p, out_n, 1e-5)
    assert_rel_close(out_r, out_n, 1e-5)
    assert_rel_close(final_p, final_n, 1e-5)
    assert_rel_close(carried, final_n, 1e-5)


def test_inter_image_path_is_not_trivial(attn):
    """Guard for the tests above: the state must change the output, else they prove nothing."""
    h, c, state = make_inputs()
    with_state, _ = attn(h, c, state)
    without, _ = attn(h, c, None)
    assert (with_state - without).abs().max() > 1e-2


def test_gradients_parallel_match_naive(attn):
    h, c, state = make_inputs()
    grads = {}
    for form in ("parallel", "naive"):
        attn.zero_grad()
        hh, cc, ss = (t.clone().requires_grad_() for t in (h, c, state))
        out, final = attn(hh, cc, ss, form=form)
        (out.pow(2).sum() + final.pow(2).sum()).backward()
        grads[form] = [hh.grad, cc.grad, ss.grad] + [p.grad.clone() for p in attn.parameters()]
    for g_parallel, g_naive in zip(grads["parallel"], grads["naive"]):
        assert_rel_close(g_parallel, g_naive, 1e-4)


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
    attn = attn.cuda()
    ref, _ = attn(h, c, state)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, final = attn(h, c, state)
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


def test_bf16_autocast_close_to_fp32(attn):
    h, c, state = make_inputs()
    ref, ref_final = attn(h, c, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, final = attn(h, c, state)
    assert final.dtype == torch.float32
    assert_rel_close(out.float(), ref, 5e-2)
    assert_rel_close(final, ref_final, 5e-2)

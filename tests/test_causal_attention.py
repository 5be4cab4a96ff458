"""Block-causal softmax attention (the paper's attention ablation): which tokens see which, the
growing key/value cache, its parameters, input checks. Its forms are held to the naive one in
test_attention_forms.py."""

import pytest
import torch
from tiny_models import randomize

from arflow.models.causal_attention import CausalSoftmaxAttention, KVCache, block_causal_mask

B, S, N, D, H = 2, 4, 6, 16, 2


@pytest.fixture
def attn():
    return randomize(CausalSoftmaxAttention(D, H), seed=1, std=0.3)


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, N, D, generator=gen), torch.randn(B, S, D, generator=gen)


def test_block_causal_mask():
    mask = block_causal_mask(images=3, tokens=2, prefix=1, device="cpu")
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert block_causal_mask(images=1, tokens=4, prefix=8, device="cpu") is None


def test_each_image_sees_itself_and_earlier_images_only(attn):
    h, c = make_inputs()
    base, _ = attn(h, c)
    s = 1
    h2 = h.clone()
    h2[:, s] += torch.randn_like(h2[:, s])
    out, _ = attn(h2, c)
    assert torch.equal(out[:, :s], base[:, :s]), "an earlier image saw a later one"
    for later in range(s + 1, S):  # every later image reads image s directly, not via a decay
        assert (out[:, later] - base[:, later]).abs().max() > 1e-3
    h3 = h.clone()
    h3[:, s, -1] += 1.0  # bidirectional inside an image: the last token moves the first
    out3, _ = attn(h3, c)
    assert (out3[:, s, 0] - base[:, s, 0]).abs().max() > 1e-4


def test_conditioning_is_not_read_and_no_decay_parameter(attn):
    h, c = make_inputs()
    assert torch.equal(attn(h, c)[0], attn(h, torch.zeros_like(c))[0])
    assert {n for n, _ in attn.named_parameters()} == {
        f"{name}_proj.weight" for name in ("q", "k", "v", "g", "out")
    }


def test_cache_grows_by_one_image_per_step(attn):
    h, c = make_inputs()
    cache = None
    for s in range(S):
        _, cache = attn(h[:, s : s + 1], c[:, s : s + 1], cache, form="recurrent")
        assert cache.k.shape == cache.v.shape == (B, H, (s + 1) * N, D // H)
    _, whole = attn(h, c)
    torch.testing.assert_close(cache.k, whole.k)
    torch.testing.assert_close(cache.v, whole.v)


def test_an_empty_cache_equals_none(attn):
    h, c = make_inputs()
    empty = KVCache(torch.zeros(B, H, 0, D // H), torch.zeros(B, H, 0, D // H))
    torch.testing.assert_close(attn(h, c, empty)[0], attn(h, c)[0])


def test_cache_of_another_batch_size_is_refused(attn):
    h, c = make_inputs()
    _, cache = attn(h, c)
    with pytest.raises(ValueError, match=r"expected \(1, 2, L, 8\).*another batch size"):
        attn(h[:1], c[:1], cache)


def test_recurrent_form_takes_one_image(attn):
    h, c = make_inputs()
    with pytest.raises(ValueError, match="one image per call, got S=4"):
        attn(h, c, form="recurrent")

"""The fast forms of both attentions against their naive references, in fla's manner: a grid
of batch sizes, sequence lengths, head counts and head sizes, in fp32 and under bf16 autocast,
comparing the output, the final state and every gradient (h, c, the initial state and each
parameter). The references (arflow.models.naive) are independent transcriptions of the math
(explicit loops, their own norms), always in fp32, so the bf16 cases measure the fast forms'
round-off as well."""

import pytest
import torch
from tiny_models import err_ratio, heads_scaled, randomize

from arflow.models import naive
from arflow.models.causal_attention import CausalSoftmaxAttention, KVCache
from arflow.models.hybrid_attention import HybridAttention

TOKENS = 6  # per image; small because the naive hybrid form loops over tokens
CACHED_IMAGES = 2  # images in the causal attention's initial cache
# err_ratio bounds (RMS error / RMS value); measured worst cases: 1e-6 in fp32, 2.3e-2 in bf16.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def make_case(kind: str, batch: int, images: int, heads: int, head_dim: int, seed: int = 0):
    """A module with random weights (head h's q/k/v rows scaled by h + 1), inputs, and an
    initial state: the hybrid's (B, H, d, d) or a KVCache of CACHED_IMAGES earlier images."""
    dim = heads * head_dim
    cls = HybridAttention if kind == "hybrid" else CausalSoftmaxAttention
    torch.manual_seed(seed)
    module = heads_scaled(randomize(cls(dim, heads), seed, std=0.3))
    gen = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(batch, images, TOKENS, dim, generator=gen)
    c = torch.randn(batch, images, dim, generator=gen)
    if kind == "hybrid":
        state = torch.randn(batch, heads, head_dim, head_dim, generator=gen) * 0.3
    else:
        shape = (batch, heads, CACHED_IMAGES * TOKENS, head_dim)
        state = KVCache(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    return module, h, c, state


def tensors_of(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, KVCache) else (state,)


def with_grad(state):
    leaves = tuple(t.clone().requires_grad_() for t in tensors_of(state))
    return (KVCache(*leaves) if isinstance(state, KVCache) else leaves[0]), leaves


def run(module, form: str, h, c, state, dtype: torch.dtype, probes):
    """Output, final state tensors and the gradients of a fixed random projection of both
    with respect to (h, c, initial state tensors, parameters), for one form ("naive": the
    reference of arflow.models.naive)."""
    h, c = h.clone().requires_grad_(), c.clone().requires_grad_()
    state, state_leaves = with_grad(state)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if form == "recurrent":  # image by image, as the samplers call it
            outs = []
            for s in range(h.shape[1]):
                out, state = module(h[:, s : s + 1], c[:, s : s + 1], state, form="recurrent")
                outs.append(out)
            out = torch.cat(outs, dim=1)
        elif form == "naive":
            out, state = naive.attention(module, h, c, state)
        else:
            out, state = module(h, c, state, form=form)
    finals = tensors_of(state)
    loss = (out.float() * probes[0]).sum()
    loss = loss + sum((f.float() * p).sum() for f, p in zip(finals, probes[1:]))
    inputs = (h, c, *state_leaves, *module.parameters())
    names = ["h", "c"] + [f"state[{i}]" for i in range(len(state_leaves))]
    names += [n for n, _ in module.named_parameters()]
    # c is unused by the causal attention: its gradient is zero in every form.
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return out, finals, dict(zip(names, grads))


def make_probes(module, h, c, state, seed=7):
    """Random weights for the scalar whose gradients are compared (shapes from the naive run)."""
    with torch.no_grad():
        out, final = naive.attention(module, h, c, state)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen) for t in (out, *tensors_of(final))]


@pytest.mark.parametrize("heads, head_dim", [(1, 8), (3, 4)])
@pytest.mark.parametrize("images", [1, 2, 5])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["hybrid", "causal_softmax"])
def test_fast_forms_match_naive(kind, dtype, batch, images, heads, head_dim):
    module, h, c, state = make_case(kind, batch, images, heads, head_dim)
    probes = make_probes(module, h, c, state)
    ref_out, ref_final, ref_grads = run(module, "naive", h, c, state, torch.float32, probes)
    tol = TOLERANCE[dtype]
    for form in ("parallel", "recurrent"):
        out, final, grads = run(module, form, h, c, state, dtype, probes)
        assert out.dtype == dtype  # autocast: the output projection runs in bf16
        assert err_ratio(out, ref_out) < tol, f"{form} output: {err_ratio(out, ref_out):.1e}"
        for i, (f, r) in enumerate(zip(final, ref_final, strict=True)):
            assert f.shape == r.shape, f"{form} final state[{i}] shape"
            assert err_ratio(f, r) < tol, f"{form} final state[{i}]: {err_ratio(f, r):.1e}"
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            err = err_ratio(g, ref_grads[name])
            assert err < tol, f"{form} gradient of {name}: {err:.1e}"

"""Helpers shared by the model tests: small models with all weights random (not DiT's zero
init, which makes every block the identity and would let attention bugs through), random
sequences, and error measures."""

import torch

from arflow.models import ARFlow

# The `model` section of the smallest trainer configs (tests that run the trainer end to end).
TINY_MODEL_CONFIG = {
    "name": "ARFlow-S/4",
    "input_size": 8,
    "in_channels": 1,
    "num_classes": 4,
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
}


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def heads_scaled(module: torch.nn.Module) -> torch.nn.Module:
    """Multiply head h's q/k/v projection rows by h + 1 in an attention module: trained heads
    have unequal scales, and only then does a norm over the full width differ from a norm per
    head."""
    H, d = module.num_heads, module.head_dim
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            proj.weight.view(H, d, -1).mul_(torch.arange(1, H + 1.0)[:, None, None])
    return module


def tiny_model(seed: int = 0, **overrides) -> ARFlow:
    kwargs = dict(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        class_dropout_prob=0.1,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize(ARFlow(**kwargs), seed).eval()


def sequence(batch=2, images=4, channels=3, size=8, seed=0):
    """Random (x (B, S, C, H, W), t (B, S) sorted ascending, y (B,))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, images, channels, size, size, generator=gen)
    t = torch.rand(batch, images, generator=gen).sort(dim=1).values
    y = torch.randint(0, 5, (batch,), generator=gen)
    return x, t, y


def err_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of a - b over the RMS of the reference b (fla's measure): robust to a few large
    round-off outliers in low precision, and 0 only when a equals b."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str = "") -> None:
    """max |a - b| <= rel * max |b|."""
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max() / b.abs().max())
    assert err < rel, f"{what} relative error {err:.2e} > {rel:.0e}".strip()

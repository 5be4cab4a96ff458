"""Small models with all weights random (not DiT's zero init, which makes every block the
identity and would let attention bugs through)."""

import torch

from arflow.models import ARFlow


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
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

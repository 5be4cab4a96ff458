import torch
from tiny_models import sequence, tiny_model

from arflow.flow.transport import interpolate, sample_noise_levels, training_loss, velocity_target


def test_noise_levels_sorted_uniform():
    t = sample_noise_levels(4000, 5, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000, 5)
    assert (t.diff(dim=1) >= 0).all() and t.min() >= 0 and t.max() <= 1
    # Sorted U(0,1)^5: the k-th order statistic has mean k / 6.
    expected = torch.arange(1, 6) / 6
    assert (t.mean(0) - expected).abs().max() < 0.01


def test_interpolant_endpoints_and_target():
    x1, _, _ = sequence(seed=1)
    x0, _, _ = sequence(seed=2)
    zeros, ones = torch.zeros(x1.shape[:2]), torch.ones(x1.shape[:2])
    assert torch.equal(interpolate(x1, x0, zeros), x0)
    assert torch.equal(interpolate(x1, x0, ones), x1)
    half = interpolate(x1, x0, ones / 2)
    torch.testing.assert_close(half, (x1 + x0) / 2)
    torch.testing.assert_close(velocity_target(x1, x0), x1 - x0)


def test_training_loss_is_sequence_mse():
    model = tiny_model()
    x1, _, y = sequence(images=3)
    loss = training_loss(model, x1, y, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = sample_noise_levels(x1.shape[0], 3, generator=gen)
    x0 = torch.randn(x1.shape, generator=gen)
    expected = ((model(interpolate(x1, x0, t), t, y) - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)

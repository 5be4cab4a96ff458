"""Fréchet distance, Inception Score and the all-reducible statistics, on synthetic features."""

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from arflow.eval import FeatureStats, frechet_distance, inception_score


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def fid_with_scipy_sqrtm(mu1, s1, mu2, s2, eps=1e-6):
    """The usual formula: sqrtm of the product, retried on an offset diagonal if not finite."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def test_frechet_matches_closed_form_for_commuting_gaussians():
    rng = np.random.default_rng(0)
    d = 32
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis: S1 S2 = S2 S1
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_of_identical_gaussians_is_zero_and_one_dimensional_case():
    rng = np.random.default_rng(1)
    s = random_spd(rng, 16)
    assert abs(frechet_distance(np.ones(16), s, np.ones(16), s)) < 1e-10
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(2)
    d = 64
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(fid_with_scipy_sqrtm(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_on_singular_covariances_of_few_samples():
    # Fewer samples than dimensions (as with a small N in a test run): both covariances are
    # singular. Real, finite, and equal to the scipy formula within its own accuracy.
    rng = np.random.default_rng(3)
    d, n = 64, 20
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(fid_with_scipy_sqrtm(x.mean(0), s1, y.mean(0), s2), rel=1e-4)


def test_frechet_rejects_mismatched_shapes_and_nan():
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def direct_inception_score(logits, splits):
    """Per-sample formula: contiguous splits by index, exp of the mean KL to the split marginal."""
    p = scipy.special.softmax(logits, axis=1)
    n = len(p)
    split_of = np.arange(n) * splits // n
    scores = []
    for s in range(splits):
        ps = p[split_of == s]
        marginal = ps.mean(0)
        kl = (ps * (np.log(ps) - np.log(marginal))).sum(1).mean()
        scores.append(np.exp(kl))
    return np.mean(scores), np.std(scores)


def test_stats_in_uneven_shuffled_batches_match_numpy():
    rng = np.random.default_rng(4)
    n, d, k, splits = 53, 16, 7, 5
    feats, logits = rng.standard_normal((n, d)) * 3 + 1, rng.standard_normal((n, k)) * 2
    stats = FeatureStats(n, splits, dim=d, num_logits=k)
    order = rng.permutation(n)  # order and batch sizes must not matter
    for batch in np.split(order, [7, 20, 21, 40]):
        stats.update(
            torch.from_numpy(feats[batch]), torch.from_numpy(logits[batch]), torch.from_numpy(batch)
        )
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        stats.inception_score(), direct_inception_score(logits, splits), rtol=1e-10
    )
    assert stats.count.item() == n


def test_inception_score_needs_samples_in_every_split():
    with pytest.raises(ValueError, match="every Inception Score split"):
        inception_score(np.array([2.0, 0.0]), np.zeros(2), np.ones((2, 3)))

"""FID, KID, IS and precision/recall (torch-fidelity) against independent float64 computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_pipeline.metrics import (
    feature_metrics,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    kernel_inception_distance,
    parse_metrics,
    precision_recall,
)


def correlated_features(count: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    mixing = np.random.default_rng(1234).normal(size=(dim, dim)) / np.sqrt(dim)  # one distribution
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(count, dim)) @ mixing + shift).float()


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2 sqrtm(Σ₁Σ₂)), float64, SciPy's matrix square root."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (xᵀy/d + 1)³."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def test_fid_matches_an_independent_float64_computation():
    generated = correlated_features(300, 32, seed=0)
    reference = correlated_features(400, 32, seed=1, shift=0.3)
    ours = frechet_distance(gaussian_statistics(generated), gaussian_statistics(reference))
    assert ours == pytest.approx(reference_fid(generated.numpy(), reference.numpy()), rel=1e-6)
    assert ours > 1.0


def test_fid_of_a_set_against_itself_is_zero():
    features = correlated_features(200, 16, seed=2)
    stats = gaussian_statistics(features)
    assert abs(frechet_distance(stats, stats)) < 1e-8


def test_fid_refuses_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="Feature sizes differ"):
        frechet_distance(gaussian_statistics(torch.randn(10, 4)), gaussian_statistics(torch.randn(10, 5)))


def test_kid_matches_the_unbiased_mmd_formula():
    generated = correlated_features(60, 8, seed=3)
    reference = correlated_features(60, 8, seed=4, shift=0.5)
    # One subset of all samples: torch-fidelity's subset is a permutation, which MMD ignores.
    result = kernel_inception_distance(generated, reference, subsets=1, subset_size=60)
    assert result["kid_mean"] == pytest.approx(reference_mmd2(generated.numpy(), reference.numpy()), rel=1e-6)
    assert result["kid_std"] == 0.0
    alike = kernel_inception_distance(correlated_features(400, 8, seed=3), correlated_features(400, 8, seed=13),
                                      subsets=10, subset_size=200)  # fmt: skip
    assert abs(alike["kid_mean"]) < 0.1 * result["kid_mean"]


def test_inception_score_equals_the_closed_form():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(50, 10))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0)
    closed_form = np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean())
    result = inception_score(torch.from_numpy(logits).float(), splits=1)
    assert result["isc_mean"] == pytest.approx(closed_form, rel=1e-5)
    # One-hot confident predictions spread evenly over k classes give IS = k.
    confident = torch.full((40, 4), -50.0)
    confident[torch.arange(40), torch.arange(40) % 4] = 50.0
    assert inception_score(confident, splits=1)["isc_mean"] == pytest.approx(4.0, rel=1e-6)


def test_precision_and_recall_of_a_set_against_itself_are_one_and_fall_for_a_shifted_set():
    features = correlated_features(80, 8, seed=6)
    same = precision_recall(features, features)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(features + 100.0, features)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_feature_metrics_needs_reference_features_for_kid_and_prc():
    generated = {"2048": correlated_features(20, 8, seed=7)}
    stats = gaussian_statistics(correlated_features(20, 8, seed=8))
    assert "fid" in feature_metrics(["fid"], generated, stats, None)
    with pytest.raises(ValueError, match="need the reference's features"):
        feature_metrics(["fid", "kid"], generated, stats, None)


def test_parse_metrics():
    assert parse_metrics("bpd, FID,kid") == ["fid", "kid", "bpd"]
    with pytest.raises(ValueError, match="Unknown metrics"):
        parse_metrics("fid,lpips")

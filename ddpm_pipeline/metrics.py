"""Sample-quality metrics from Inception features, computed by torch-fidelity.

* FID (Heusel et al.): ``‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^{1/2})`` of the 2048-d features'
  Gaussian statistics (``μ`` the mean, ``Σ`` the unbiased covariance).
* KID (Bińkowski et al.): the unbiased MMD² with the kernel ``k(x, y) = (xᵀy/d + 1)³``, averaged
  over random subsets (mean and standard deviation).
* IS (Salimans et al.): ``exp(E_x KL(p(y|x) ‖ p(y)))`` from the classifier's logits, over splits.
* Precision / recall (Kynkäänniemi et al.): the share of generated samples inside the real
  features' k-NN balls, and of real samples inside the generated ones' (k = 3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

#: The metrics ``--metrics`` accepts (``bpd`` is the likelihood, not computed from features).
METRICS = ("fid", "isc", "kid", "prc", "bpd")
FEATURE_METRICS = ("fid", "isc", "kid", "prc")
#: The feature metrics that compare the samples with reference data (the Inception Score needs none).
REFERENCE_METRICS = ("fid", "kid", "prc")
#: k of precision/recall's k-NN balls
PRC_NEIGHBORHOOD = 3
#: The headline scores the feature metrics put in a report (:func:`feature_metrics`), with their names for people.
SCORE_NAMES = {"fid": "FID", "kid_mean": "KID", "isc_mean": "Inception Score", "precision": "Precision", "recall": "Recall"}


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """``"fid,kid"`` or ``["fid", "kid"]`` → a validated list, in :data:`METRICS` order."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        problem = f"Unknown metrics {unknown}" if unknown else "No metric named"
        raise ValueError(f"{problem}: choose from {', '.join(METRICS)} (comma-separated).")
    return [m for m in METRICS if m in names]


def gaussian_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu": mean, "sigma": unbiased covariance}`` in float64 (torch-fidelity's)."""
    return fid_features_to_statistics(features.double().cpu())


def frechet_distance(statistics_1: Mapping[str, np.ndarray], statistics_2: Mapping[str, np.ndarray]) -> float:
    """FID between two sets of Gaussian statistics (torch-fidelity's formula, float64)."""
    stats_1 = {key: np.asarray(statistics_1[key], dtype=np.float64) for key in ("mu", "sigma")}
    stats_2 = {key: np.asarray(statistics_2[key], dtype=np.float64) for key in ("mu", "sigma")}
    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"Feature sizes differ: {stats_1['mu'].shape} vs {stats_2['mu'].shape}.")
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def kernel_inception_distance(
    generated: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> dict[str, float]:
    """KID mean and std over ``subsets`` random subsets of ``min(subset_size, N₁, N₂)`` features."""
    size = min(subset_size, len(generated), len(reference))
    if size < 2:
        raise ValueError("KID needs at least 2 samples on each side.")
    result = kid_features_to_metric(
        generated.double().cpu(),
        reference.double().cpu(),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return {"kid_mean": result["kernel_inception_distance_mean"], "kid_std": result["kernel_inception_distance_std"],
            "kid_subset_size": size}  # fmt: skip


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> dict[str, float]:
    """IS mean and std over ``min(splits, N)`` splits: ``exp(mean_x Σ_y p(y|x) (log p(y|x) - log p(y)))``."""
    splits = max(1, min(splits, len(logits)))
    result = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"isc_mean": result["inception_score_mean"], "isc_std": result["inception_score_std"], "isc_splits": splits}


def fewest_images(metrics: Iterable[str]) -> int:
    """The fewest images on each side (samples, reference) that ``metrics`` can be computed from:
    ``k + 1`` with precision/recall (each image's ``k`` nearest neighbours, :data:`PRC_NEIGHBORHOOD`),
    else 2 (FID's unbiased covariance divides by ``N − 1``, KID's unbiased MMD² by ``m(m − 1)``)."""
    return PRC_NEIGHBORHOOD + 1 if "prc" in metrics else 2


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, float]:
    """Improved precision/recall and their F-score with ``neighborhood``-NN balls."""
    if min(len(generated), len(reference)) <= neighborhood:
        raise ValueError(f"Precision/recall needs more than {neighborhood} samples on each side.")
    result = prc_features_to_metric(
        generated.float().cpu(), reference.float().cpu(), prc_neighborhood=neighborhood, prc_batch_size=10000,
        save_cpu_ram=False, verbose=False,
    )  # fmt: skip
    return {"precision": result["precision"], "recall": result["recall"], "f_score": result["f_score"]}


def feature_metrics(
    metrics: Iterable[str],
    generated: Mapping[str, torch.Tensor],
    reference_statistics: Mapping[str, np.ndarray] | None,
    reference_features: torch.Tensor | None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    seed: int = 2020,
) -> dict[str, Any]:
    """Every requested feature metric of ``generated`` (features by layer) against the reference."""
    results: dict[str, Any] = {}
    metrics = list(metrics)
    needs_features = [m for m in ("kid", "prc") if m in metrics]
    if needs_features and reference_features is None:
        raise ValueError(
            f"{', '.join(needs_features)} need the reference's features, but the reference gives only FID "
            "statistics (mu, sigma): pass a data source as --reference, or a stats file that has 'features'."
        )
    if "fid" in metrics:
        if reference_statistics is None:
            raise ValueError("FID needs the reference statistics.")
        results["fid"] = frechet_distance(gaussian_statistics(generated["2048"]), reference_statistics)
    if "kid" in metrics:
        results.update(kernel_inception_distance(generated["2048"], reference_features, kid_subsets, kid_subset_size, seed))
    if "isc" in metrics:
        results.update(inception_score(generated["logits_unbiased"], splits=isc_splits, seed=seed))
    if "prc" in metrics:
        results.update(precision_recall(generated["2048"], reference_features))
    return results

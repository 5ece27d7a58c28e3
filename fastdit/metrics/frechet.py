"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula, any feature extractor).

    FD = |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a^1/2 S_b S_a^1/2)^1/2

Computed in float64 through symmetric eigendecompositions only (``numpy.linalg.eigh``): the square roots
are of symmetric positive semi-definite matrices, tiny negative eigenvalues from round-off are clipped to
zero, so near-singular or rank-deficient covariances (fewer samples than features, duplicated features)
give a finite, real, non-negative distance -- never the complex values ``scipy.linalg.sqrtm`` can return.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np


def _as_features(features: Any, name: str) -> np.ndarray:
    """(N, F) float64 numpy array from a numpy array or a torch tensor, with clear errors."""
    if hasattr(features, "detach"):  # torch tensor, without importing torch here
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N samples, F features), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return x


def gaussian_stats(features: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64 (N >= 2)."""
    x = _as_features(features, "features")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: Any, sigma: Any, name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be 1-D (F,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{name} must be ({mu.shape[0]}, {mu.shape[0]}) to match mu{name}, "
                         f"got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name} / sigma{name} have non-finite values")
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, symmetric PSD square roots).

    ``tr (S1^1/2 S2 S1^1/2)^1/2`` is the sum of the square roots of the (clipped) eigenvalues of the
    symmetric PSD matrix ``S1^1/2 S2 S1^1/2``; the result is clipped at 0 (round-off on identical inputs)."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (N, F) feature sets (numpy arrays or tensors).

    ValueError when the feature dimensions differ, a set has fewer than 2 samples, or a value is not
    finite. The sets may have different sizes; small sets bias the figure upwards (compare figures
    computed at the same sample counts)."""
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: features_a has {a.shape[1]}, features_b {b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))

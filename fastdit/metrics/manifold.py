"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"): each set's manifold is the union of balls around its samples, each ball's
radius the distance to that sample's k-th nearest neighbour within the set.

* precision: the fraction of fake samples inside the real manifold (sample quality);
* recall: the fraction of real samples inside the fake manifold (coverage / diversity).

Distances are Euclidean, in float64, computed with ``torch.cdist`` in row chunks so that 10k x 10k sets
need only ``chunk x N`` distances at a time.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import torch

DEFAULT_CHUNK = 1024  # rows of the distance matrix held at once (1024 x 10k float64 = 80 MB)


def _as_tensor(features: Any, name: str) -> torch.Tensor:
    x = features.detach().cpu() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    x = x.to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N samples, F features), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return x


def _check_k(k: int, n: int, name: str) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} needs more than k samples in {name}, which has {n}")


def _check_chunk(chunk: int) -> int:
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def kth_neighbour_radii(features: Any, k: int = 3, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(N,) float64: each sample's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    chunk = _check_chunk(chunk)
    x = _as_tensor(features, "features")
    _check_k(k, x.shape[0], "features")
    radii = []
    for rows in x.split(chunk):
        d = torch.cdist(rows, x)
        # the k+1 smallest include the sample itself (distance 0): the k-th neighbour is the last of them
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def manifold_membership(reference: Any, queries: Any, k: int = 3, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """(M,) bool: whether each query lies in the k-NN manifold of ``reference`` (within the k-th-neighbour
    radius of at least one reference sample)."""
    ref = _as_tensor(reference, "reference")
    q = _as_tensor(queries, "queries")
    if ref.shape[1] != q.shape[1]:
        raise ValueError(f"feature dimensions differ: reference has {ref.shape[1]}, queries {q.shape[1]}")
    radii = kth_neighbour_radii(ref, k, chunk)
    chunk = _check_chunk(chunk)
    inside = [(torch.cdist(rows, ref) <= radii[None, :]).any(dim=1) for rows in q.split(chunk)]
    return torch.cat(inside).numpy() if inside else np.zeros(0, dtype=bool)


def precision_recall(real_features: Any, fake_features: Any, k: int = 3,
                     chunk: int = DEFAULT_CHUNK) -> Tuple[float, float]:
    """(precision, recall) of fake samples against real ones in a feature space (k-NN manifolds, k=3 as in
    the paper). ValueError when k >= either set's size, the feature dimensions differ or a value is not
    finite."""
    real = _as_tensor(real_features, "real_features")
    fake = _as_tensor(fake_features, "fake_features")
    _check_k(k, real.shape[0], "real_features")
    _check_k(k, fake.shape[0], "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real has {real.shape[1]}, fake {fake.shape[1]}")
    precision = float(manifold_membership(real, fake, k, chunk).mean())
    recall = float(manifold_membership(fake, real, k, chunk).mean())
    return precision, recall

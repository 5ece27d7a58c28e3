"""Fréchet distance: closed forms (diagonal, commuting, 2×2 general SPD), scipy's sqrtm formula, large-N
convergence, symmetry, zero on identical sets, and finite non-negative values on rank-deficient covariances."""
import numpy as np
import pytest
import torch

from fastdit.metrics import frechet_distance, frechet_distance_from_stats, gaussian_stats


def _spd(rng, f, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    return (q * np.geomspace(1.0, 1.0 / cond, f) * rng.uniform(0.5, 2.0)) @ q.T


def test_from_stats_equals_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(np.random.randint(2**31))
    f = 13
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    a, b = rng.uniform(0.1, 3.0, f), rng.uniform(0.1, 3.0, f)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_from_stats_equals_the_closed_form_for_commuting_spd_covariances():
    rng = np.random.default_rng(np.random.randint(2**31))
    f = 23
    q, _ = np.linalg.qr(rng.standard_normal((f, f)))
    a, b = rng.uniform(0.1, 3.0, f), rng.uniform(0.1, 3.0, f)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance_from_stats(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("trial", range(5))
def test_from_stats_equals_the_closed_form_for_general_2x2_spd(trial):
    # for 2×2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); with M = A^½ B A^½: tr M = tr AB, det M = det A det B
    rng = np.random.default_rng(np.random.randint(2**31))
    la, lb = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    a, b = la @ la.T + 0.1 * np.eye(2), lb @ lb.T + 0.1 * np.eye(2)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    tr_sqrt = np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    want = ((mu1 - mu2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert frechet_distance_from_stats(mu1, a, mu2, b) == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("f", [1, 7, 64, 123])
def test_matches_scipy_sqrtm_formula_on_random_spd(f):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(np.random.randint(2**31))
    a, b = _spd(rng, f), _spd(rng, f)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    covmean = linalg.sqrtm(a @ b)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * np.trace(covmean).real
    assert frechet_distance_from_stats(mu1, a, mu2, b) == pytest.approx(want, rel=1e-10)


def test_converges_to_the_population_distance_at_large_n():
    rng = np.random.default_rng(np.random.randint(2**31))
    f, n = 4, 200_000
    a, b = _spd(rng, f, cond=4.0), _spd(rng, f, cond=4.0)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    want = frechet_distance_from_stats(mu1, a, mu2, b)
    xa = rng.multivariate_normal(mu1, a, size=n)
    xb = rng.multivariate_normal(mu2, b, size=n)
    got = frechet_distance(xa, xb)
    # the estimate's error is O(sqrt(FD / n) + f / n): a few hundredths here
    assert abs(got - want) < 0.05 + 0.02 * want, (got, want)


def test_symmetric_zero_on_identical_sets_and_tensors_accepted():
    rng = np.random.default_rng(np.random.randint(2**31))
    x, y = rng.standard_normal((113, 17)), rng.standard_normal((57, 17)) * 1.5 + 0.3
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)
    assert frechet_distance(x, y) > 0.1
    assert 0.0 <= frechet_distance(x, x.copy()) < 1e-10 * np.trace(np.cov(x.T))
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        frechet_distance(x.astype(np.float32), y.astype(np.float32)), rel=1e-12)


@pytest.mark.parametrize("case", ["n_below_f", "duplicated_features", "duplicated_samples", "constant_feature"])
def test_finite_and_non_negative_on_rank_deficient_covariances(case):
    rng = np.random.default_rng(np.random.randint(2**31))
    if case == "n_below_f":
        x, y = rng.standard_normal((7, 72)), rng.standard_normal((11, 72)) + 0.1
    elif case == "duplicated_features":
        base = rng.standard_normal((50, 9))
        x, y = np.repeat(base, 8, axis=1), np.repeat(rng.standard_normal((60, 9)), 8, axis=1)
    elif case == "duplicated_samples":
        x, y = np.repeat(rng.standard_normal((5, 30)), 4, axis=0), np.repeat(rng.standard_normal((6, 30)), 3, axis=0)
    else:
        x, y = rng.standard_normal((40, 12)), rng.standard_normal((40, 12))
        x[:, 3] = y[:, 3] = 0.7
    fd = frechet_distance(x, y)
    assert isinstance(fd, float) and np.isfinite(fd) and fd >= 0
    self_fd = frechet_distance(x, x)
    assert isinstance(self_fd, float) and 0 <= self_fd < 1e-6 * np.trace(gaussian_stats(x)[1])
    assert fd > self_fd


def test_gaussian_stats_is_the_unbiased_estimate_in_float64():
    rng = np.random.default_rng(np.random.randint(2**31))
    x = rng.standard_normal((31, 5)).astype(np.float32)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    assert np.array_equal(sigma, sigma.T)


def test_clear_errors():
    x = np.random.standard_normal((10, 4))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(x, np.random.standard_normal((10, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x, x[:1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(bad, x)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(x, bad)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(x[:, 0], x)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1 must be"):
        frechet_distance_from_stats(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))

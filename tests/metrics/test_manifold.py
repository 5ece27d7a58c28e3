"""Improved precision / recall (k-NN manifolds): constructed sets with known answers, a brute-force float64
reference (any chunking gives the same answer), and clear errors."""
import numpy as np
import pytest
import torch

from fastdit.metrics import kth_neighbour_radii, manifold_membership, precision_recall


def _reference_membership(ref, q, k):
    d_ref = np.sqrt(((ref[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    radii = np.sort(d_ref, axis=1)[:, k]  # column 0 is the sample itself
    d = np.sqrt(((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    return (d <= radii[None, :]).any(axis=1), radii


def test_identical_sets_score_one_one():
    x = np.random.standard_normal((113, 7))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_far_apart_sets_score_zero_zero():
    x = np.random.standard_normal((57, 5))
    assert precision_recall(x, np.random.standard_normal((41, 5)) + 100.0, k=3) == (0.0, 0.0)


def test_fake_from_one_tight_cluster_is_precise_but_misses_the_rest():
    rng = np.random.default_rng(np.random.randint(2**31))
    tight = rng.standard_normal((60, 6)) * 0.01
    wide = rng.standard_normal((90, 6)) + 20.0
    real = np.concatenate([tight, wide])
    fake = tight[rng.choice(60, 25, replace=False)]
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert 0 < recall <= 60 / 150  # at most the tight cluster is covered
    assert recall < 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_a_brute_force_reference_with_any_chunking(k):
    rng = np.random.default_rng(np.random.randint(2**31))
    real = rng.standard_normal((113, 9))
    fake = rng.standard_normal((71, 9)) * 1.3 + 0.4
    want_in_real, radii = _reference_membership(real, fake, k)
    want_in_fake, _ = _reference_membership(fake, real, k)
    np.testing.assert_allclose(kth_neighbour_radii(real, k).numpy(), radii, rtol=1e-10)
    for chunk in (1, 7, 64, 4096):
        assert np.array_equal(manifold_membership(real, fake, k, chunk=chunk), want_in_real)
        p, r = precision_recall(real, fake, k=k, chunk=chunk)
        assert p == want_in_real.mean() and r == want_in_fake.mean()
    assert 0 < want_in_real.mean() < 1 and 0 < want_in_fake.mean() < 1  # a non-trivial case
    p32, r32 = precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=k)
    assert abs(p32 - want_in_real.mean()) <= 2 / 71 and abs(r32 - want_in_fake.mean()) <= 2 / 113


def test_clear_errors():
    x = np.random.standard_normal((5, 3))
    with pytest.raises(ValueError, match="k=5 needs more than k samples"):
        precision_recall(x, np.random.standard_normal((20, 3)), k=5)
    with pytest.raises(ValueError, match="k=3 needs more than k samples in fake"):
        precision_recall(np.random.standard_normal((20, 3)), x[:3], k=3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(x, np.random.standard_normal((6, 4)), k=2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(bad, x, k=2)
    with pytest.raises(ValueError, match="positive integer"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        precision_recall(x, x, k=2, chunk=0)


@pytest.mark.slow
def test_ten_thousand_by_ten_thousand_in_chunks():
    """10k x 10k: only chunk x 10k distances exist at a time (80 MB in float64 at the default chunk)."""
    x = torch.randn(10_000, 64)
    y = x[torch.randperm(10_000)] + 0.01 * torch.randn(10_000, 64)
    p, r = precision_recall(x, y, k=3)
    assert p > 0.99 and r > 0.99
    far = precision_recall(x, y + 100.0, k=3)
    assert far == (0.0, 0.0)

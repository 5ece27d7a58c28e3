"""The digits feature extractor: accurate on held-out real digits, deterministic under a seed (bitwise), cached
(a corrupt cache file is retrained with a warning), and it leaves the global RNG alone."""
import os

import numpy as np
import pytest
import torch

from fastdit.demos.digits import load_digit_images, split_held_out
from fastdit.metrics import DigitFeatures
from fastdit.metrics.digits import TrainSettings

SHORT = TrainSettings(epochs=3)  # seconds → a fraction of one: the determinism and cache tests need no accuracy


@pytest.fixture(scope="module")
def data():
    images, labels = load_digit_images(16)
    train, held = split_held_out(labels, 0.2, 0)
    return images[train], labels[train], images[held], labels[held]


def test_held_out_accuracy_and_features(data):
    xtr, ytr, xho, yho = data
    state = torch.get_rng_state()
    ext = DigitFeatures.fit(xtr, ytr, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # a private RNG
    assert ext.accuracy(xho, yho) > 0.9
    feats = ext.features(xho)
    assert feats.shape == (len(xho), DigitFeatures.feature_dim) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats.std(0) > 0).sum() > DigitFeatures.feature_dim // 2
    assert np.array_equal(ext.features(xho.numpy()), feats)  # numpy in, same features
    with pytest.raises(ValueError, match="trained on 16x16"):
        ext.features(torch.zeros(2, 1, 8, 8))


def test_same_seed_same_features_bitwise(data):
    xtr, ytr, xho, _ = data
    a = DigitFeatures.fit(xtr[:300], ytr[:300], seed=3, settings=SHORT).features(xho)
    b = DigitFeatures.fit(xtr[:300], ytr[:300], seed=3, settings=SHORT).features(xho)
    c = DigitFeatures.fit(xtr[:300], ytr[:300], seed=4, settings=SHORT).features(xho)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cache_round_trip_and_corrupt_cache_is_retrained(data, tmp_path):
    xtr, ytr, xho, _ = data
    fresh = DigitFeatures.fit(xtr[:300], ytr[:300], seed=5, settings=SHORT, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("digit_features-v") and not fresh.from_cache
    cached = DigitFeatures.fit(xtr[:300], ytr[:300], seed=5, settings=SHORT, cache_dir=str(tmp_path))
    assert cached.from_cache and np.array_equal(cached.features(xho), fresh.features(xho))
    # other data or seed: another file, not the cached weights
    other = DigitFeatures.fit(xtr[:300], ytr[:300], seed=6, settings=SHORT, cache_dir=str(tmp_path))
    assert not other.from_cache and len(os.listdir(tmp_path)) == 2

    path = tmp_path / files[0]
    for garbage in (b"not a torch file", b""):
        path.write_bytes(garbage)
        with pytest.warns(RuntimeWarning, match="unreadable.*retraining"):
            again = DigitFeatures.fit(xtr[:300], ytr[:300], seed=5, settings=SHORT, cache_dir=str(tmp_path))
        assert not again.from_cache and np.array_equal(again.features(xho), fresh.features(xho))
    # a readable file with the wrong contents is retrained too, and the cache is rewritten
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.warns(RuntimeWarning, match="retraining"):
        DigitFeatures.fit(xtr[:300], ytr[:300], seed=5, settings=SHORT, cache_dir=str(tmp_path))
    assert DigitFeatures.fit(xtr[:300], ytr[:300], seed=5, settings=SHORT, cache_dir=str(tmp_path)).from_cache


def test_clear_errors(data):
    xtr, ytr, _, _ = data
    with pytest.raises(ValueError, match="labels for"):
        DigitFeatures.fit(xtr[:50], ytr[:40], seed=0, settings=SHORT)
    with pytest.raises(ValueError, match="images must be"):
        DigitFeatures.fit(xtr[:50, 0, :, :8], ytr[:50], seed=0, settings=SHORT)

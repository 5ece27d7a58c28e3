import pytest
import torch

from fastdit.diffusion import PerSampleNoise


def test_prefix_property_and_reproducibility():
    a = PerSampleNoise.create(3, seed=42)
    b = PerSampleNoise.create(7, seed=42)
    assert a.seeds == b.seeds[:3]
    x, y = a.randn((2, 5)), b.randn((2, 5))
    assert x.shape == (3, 2, 5) and y.shape == (7, 2, 5)
    assert torch.equal(x, y[:3])
    assert torch.equal(a.randn((4,)), b.randn((4,))[:3])  # later draws too
    assert not torch.equal(x[0], x[1])


def test_each_sample_follows_its_own_seed():
    noise = PerSampleNoise([5, 6]).randn((3, 3))
    torch.testing.assert_close(noise[1], torch.randn(3, 3, generator=torch.Generator().manual_seed(6)))


def test_generator_source_and_dtype_device():
    a = PerSampleNoise.create(2, generator=torch.Generator().manual_seed(1))
    b = PerSampleNoise.create(2, seed=1)
    assert a.seeds == b.seeds
    out = a.randn((4,), device="cpu", dtype=torch.float64)
    assert out.dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match="at least one seed"):
        PerSampleNoise([])
    with pytest.raises(ValueError, match="batch size"):
        PerSampleNoise.create(0)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        PerSampleNoise.create(2, seed=[1, 2, 3])

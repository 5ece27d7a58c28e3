import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdit.latents import AutoencoderKLLatents, LatentSpace  # noqa: E402


def tiny_vae(shift_factor=None, scaling_factor=0.37, latent_channels=4):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
        shift_factor=shift_factor)


@pytest.mark.parametrize("shift_factor", [None, 0.0625])
def test_encode_is_shifted_scaled_posterior_mean(shift_factor):
    vae = tiny_vae(shift_factor)
    space = AutoencoderKLLatents(vae)
    assert isinstance(space, LatentSpace)
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    z = space.encode(images)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean.double()
    expected = (mean - (shift_factor or 0.0)) * 0.37
    assert z.shape == (2, 4, 8, 6) and z.dtype == torch.float32
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=1e-6)
    assert space.shift_factor == shift_factor and space.scaling_factor == pytest.approx(0.37)


@pytest.mark.parametrize("shift_factor", [None, -0.25])
def test_decode_inverts_the_latent_transform_exactly(shift_factor):
    vae = tiny_vae(shift_factor)
    space = AutoencoderKLLatents(vae)
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z / 0.37 + (shift_factor or 0.0)).sample
    torch.testing.assert_close(space.decode(z), expected, rtol=1e-5, atol=1e-5)
    # the transform itself round-trips in float64
    raw = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(space._from_latents(space._to_latents(raw)), raw, rtol=1e-12, atol=1e-12)
    # and decode(encode(x)) is the VAE's decode of the posterior mean
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(images).latent_dist.mean).sample
    torch.testing.assert_close(space.decode(space.encode(images)), ref, rtol=1e-4, atol=1e-5)


def test_overrides_interface_and_freezing():
    vae = tiny_vae(shift_factor=0.1)
    space = AutoencoderKLLatents(vae, scaling_factor=2.0, shift_factor=0.5)
    assert (space.latent_channels, space.image_channels, space.downsample_factor) == (4, 3, 2)
    assert space.latent_shape((5, 3, 16, 8)) == (5, 4, 8, 4)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    images = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    torch.testing.assert_close(space.encode(images), (mean - 0.5) * 2.0)
    assert not space.encode(images).requires_grad


def test_posterior_sampling_is_seeded():
    space = AutoencoderKLLatents(tiny_vae())
    images = torch.rand(2, 3, 8, 8)
    a = space.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    b = space.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, space.encode(images))


def test_from_pretrained_local_directory(tmp_path):
    vae = tiny_vae(shift_factor=0.2, scaling_factor=1.5)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    space = AutoencoderKLLatents.from_pretrained(str(tmp_path / "pipe"), subfolder="vae", dtype=torch.float64)
    assert space.shift_factor == pytest.approx(0.2) and space.scaling_factor == pytest.approx(1.5)
    assert next(space.vae.parameters()).dtype == torch.float64
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(space.encode(images), AutoencoderKLLatents(vae).encode(images), rtol=1e-5, atol=1e-5)
    assert space.encode(images).dtype == torch.float32  # latents are float32 whatever the VAE dtype


def test_bad_shapes_raise():
    space = AutoencoderKLLatents(tiny_vae())
    with pytest.raises(ValueError, match="divisible by 2"):
        space.encode(torch.rand(1, 3, 7, 8))
    with pytest.raises(ValueError, match="3 channels"):
        space.encode(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        space.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="scaling_factor"):
        AutoencoderKLLatents(tiny_vae(), scaling_factor=0.0)

import warnings

import pytest
import torch

from fastdit.latents import ConvAutoencoder, LatentSpace


@pytest.mark.parametrize("size, channels, latent", [(16, (16, 32), 4), (32, (16, 32), 8), (32, (8, 16, 16), 4)])
def test_shapes(size, channels, latent):
    ae = ConvAutoencoder(image_channels=1, latent_channels=3, channels=channels)
    assert isinstance(ae, LatentSpace)
    x = torch.randn(2, 1, size, size)
    assert ae.downsample_factor == size // latent
    assert ae.encode_raw(x).shape == (2, 3, latent, latent)
    assert ae(x).shape == x.shape
    assert ae.latent_shape(x.shape) == (2, 3, latent, latent)


def _dataset(n=40):
    # not-centred, not-unit data so that the raw latents have offsets to remove
    return torch.rand(n, 1, 16, 16) * 1.5 + 0.3


def test_latent_stats_match_float64_over_the_dataset():
    ae = ConvAutoencoder(latent_channels=4, channels=(8, 16))
    data = _dataset()
    mean, std = ae.fit_latent_stats(data, batch_size=7)
    with torch.no_grad():
        raw = ae.encode_raw(data).double()
    torch.testing.assert_close(mean.double(), raw.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), raw.std(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    z = ae.encode(data).double()
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert ae.stats_fitted


def test_latent_stats_from_an_iterable_of_labelled_batches():
    ae = ConvAutoencoder(latent_channels=2, channels=(8, 8))
    data = _dataset(30)
    labels = torch.arange(30)
    from_tensor = ae.fit_latent_stats(data)
    loader = [(data[i:i + 8], labels[i:i + 8]) for i in range(0, 30, 8)]
    from_loader = ConvAutoencoder(latent_channels=2, channels=(8, 8))
    from_loader.load_state_dict(ae.state_dict())
    from_loader.latent_stats_fitted.fill_(False)
    got = from_loader.fit_latent_stats(loader)
    for a, b in zip(from_tensor, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        from_loader.fit_latent_stats([])


def test_encode_normalises_and_decode_unnormalises():
    ae = ConvAutoencoder(latent_channels=3, channels=(8, 16))
    ae.fit_latent_stats(_dataset())
    x = _dataset(3)
    with torch.no_grad():
        raw = ae.encode_raw(x)
        z = ae.encode(x)
        m, s = ae.latent_mean[None, :, None, None], ae.latent_std[None, :, None, None]
        torch.testing.assert_close(z, (raw - m) / s)
        torch.testing.assert_close(ae.decode(z), ae(x), rtol=1e-4, atol=1e-5)  # decode inverts the normalisation
        latents = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(ae.decode(latents), ae.decode_raw(latents * s + m))


def test_stats_are_in_the_state_dict_and_reload(tmp_path):
    ae = ConvAutoencoder(latent_channels=3, channels=(8, 16))
    ae.fit_latent_stats(_dataset())
    state = ae.state_dict()
    assert {"latent_mean", "latent_std", "latent_stats_fitted"} <= set(state)
    torch.save(state, tmp_path / "ae.pt")
    clone = ConvAutoencoder(**ae.config)
    clone.load_state_dict(torch.load(tmp_path / "ae.pt", weights_only=True))
    assert clone.stats_fitted
    x = _dataset(2)
    with torch.no_grad():
        assert torch.equal(clone.encode(x), ae.encode(x))


def test_saved_file_carries_the_fitted_stats(tmp_path):
    """What save_autoencoder writes after fit_latent_stats is the latent space that was used: the stats (non-zero
    means, fitted flag) come back through data.options.autoencoder, and encode/decode agree exactly."""
    from fastdit.training import TrainConfig
    from fastdit.training.build import build_latent_space, save_autoencoder

    ae = ConvAutoencoder(latent_channels=3, channels=(8, 16))
    save_autoencoder(ae, str(tmp_path / "before.pt"))
    mean, std = ae.fit_latent_stats(_dataset())
    assert mean.abs().min() > 0 and not torch.equal(std, torch.ones(3))
    save_autoencoder(ae, str(tmp_path / "after.pt"))

    def load(name):
        config = TrainConfig()
        config.data.latent_shape = (3, 4, 4)
        config.data.options = {"autoencoder": str(tmp_path / name)}
        return build_latent_space(config)

    loaded = load("after.pt")
    assert loaded.stats_fitted and loaded.config == ae.config
    assert torch.equal(loaded.latent_mean, mean) and torch.equal(loaded.latent_std, std)
    x, z = _dataset(2), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), ae.eval().encode(x)) and torch.equal(loaded.decode(z), ae.decode(z))
    stale = load("before.pt")  # saved before fitting: the wrong latent space, and it says so
    assert not stale.stats_fitted and torch.equal(stale.latent_mean, torch.zeros(3))


def test_loss_is_reconstruction_mse_and_trains():
    torch.manual_seed(0)
    ae = ConvAutoencoder(latent_channels=4, channels=(8, 16))
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 4:12, 6:10] = 1.0  # a bar: easy to learn, far from the initial output
    x = x * torch.rand(32, 1, 1, 1) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.loss(x), ((ae(x) - x) ** 2).mean())
        assert ae.loss(x, reduction="none").shape == (32,)
        torch.testing.assert_close(ae.loss((x, torch.zeros(32))), ae.loss(x))  # (images, labels) batches
        before = ae.loss(x).item()
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        ae.loss(x).backward()
        opt.step()
    assert ae.loss(x).item() < 0.5 * before


def test_warning_before_fit_and_errors():
    ae = ConvAutoencoder(latent_channels=2, channels=(8,))
    with pytest.warns(UserWarning, match="fit_latent_stats"):
        ae.encode(torch.randn(1, 1, 8, 8))
    ae.fit_latent_stats(torch.randn(4, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ae.encode(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        ae.encode(torch.randn(1, 1, 7, 8))
    with pytest.raises(ValueError, match="1 channels"):
        ae.encode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        ae.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        ae.loss(torch.randn(1, 1, 8, 8), reduction="sum")
    with pytest.raises(ValueError, match="channels"):
        ConvAutoencoder(channels=())
    with pytest.raises(ValueError, match="non-empty"):
        ae.fit_latent_stats(torch.randn(0, 1, 8, 8))


def test_on_device(device):
    ae = ConvAutoencoder(latent_channels=2, channels=(8, 16))
    data = _dataset(12)
    mean, std = ae.fit_latent_stats(data)
    ae_dev = ConvAutoencoder(**ae.config).to(device)
    ae_dev.load_state_dict(ae.state_dict())
    mean_dev, std_dev = ae_dev.fit_latent_stats(data)  # images on the CPU, model on the device
    torch.testing.assert_close(mean_dev.cpu(), mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std_dev.cpu(), std, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        z = ae_dev.encode(data[:2].to(device))
        assert z.device.type == device.type and ae_dev.decode(z).shape == (2, 1, 16, 16)

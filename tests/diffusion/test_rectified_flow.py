import math

import pytest
import torch
from torch import nn

from fastdit.diffusion import RectifiedFlow, resolution_shift, timestep_shift


class TinyDenoiser(nn.Module):
    """A small conv net that uses t and a class label, (B, C, H, W) -> (B, out_mult * C, H, W)."""

    def __init__(self, channels=3, out_mult=1, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * out_mult, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, channels * out_mult)
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        h = self.conv(x) + torch.sin(t / 100)[:, None, None, None]
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return h


def test_interpolate_and_target_match_closed_form():
    z0, z1 = torch.randn(5, 3, 7, 6), torch.randn(5, 3, 7, 6)
    t = torch.rand(5)
    zt = RectifiedFlow.interpolate(z0, z1, t)
    expected = (1 - t.double()[:, None, None, None]) * z0.double() + t.double()[:, None, None, None] * z1.double()
    torch.testing.assert_close(zt.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(RectifiedFlow.target(z0, z1), z1 - z0)
    # the ends of the path are the data and the noise, and the target is the path's time derivative
    torch.testing.assert_close(RectifiedFlow.interpolate(z0, z1, torch.zeros(5)), z0)
    torch.testing.assert_close(RectifiedFlow.interpolate(z0, z1, torch.ones(5)), z1)
    h = 1e-3
    fd = (RectifiedFlow.interpolate(z0.double(), z1.double(), t.double() + h)
          - RectifiedFlow.interpolate(z0.double(), z1.double(), t.double())) / h
    torch.testing.assert_close(fd, (z1 - z0).double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 4.0])
def test_timestep_shift_formula_fixed_points_and_snr(s):
    t = torch.rand(1000, dtype=torch.float64) * 0.98 + 0.01
    shifted = timestep_shift(t, s)
    torch.testing.assert_close(shifted, s * t / (1 + (s - 1) * t))
    ends = timestep_shift(torch.tensor([0.0, 1.0], dtype=torch.float64), s)
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=torch.float64))
    # SD3's derivation: the shift divides the noise-to-signal ratio t/(1-t) ... i.e. SNR by s^2
    snr, snr_shifted = ((1 - t) / t) ** 2, ((1 - shifted) / shifted) ** 2
    torch.testing.assert_close(snr_shifted, snr / s ** 2)
    assert torch.all(torch.diff(timestep_shift(torch.sort(t).values, s)) > 0)  # monotone: keeps the order of times
    if s > 1:
        assert torch.all(shifted > t)  # more time near the noise end


def test_timestep_shift_rejects_non_positive():
    with pytest.raises(ValueError, match="shift"):
        timestep_shift(torch.rand(3), 0.0)
    with pytest.raises(ValueError, match="shift"):
        RectifiedFlow(shift=-1.0)


def test_resolution_shift_and_shift_for():
    assert resolution_shift(256) == 1.0
    assert resolution_shift(4096, 256) == pytest.approx(4.0)
    assert resolution_shift(1024, 256) == pytest.approx(2.0)
    rf = RectifiedFlow(shift_base_tokens=256, patch_size=2)
    assert rf.shift_for((64, 64)) == pytest.approx(2.0)  # 32 x 32 = 1024 tokens
    assert rf.shift_for((32, 32)) == pytest.approx(1.0)
    assert RectifiedFlow(shift=3.0).shift_for((64, 64)) == 3.0  # a fixed shift ignores the size
    with pytest.raises(ValueError, match="spatial shape"):
        rf.shift_for(None)
    with pytest.raises(ValueError, match="positive"):
        resolution_shift(0)


def test_uniform_times_come_from_the_generator():
    rf = RectifiedFlow(time_sampling="uniform")
    t = rf.sample_t(64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, torch.rand(64, generator=torch.Generator().manual_seed(3)))
    assert t.shape == (64,) and t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1


def test_logit_normal_times_closed_form_and_shift():
    rf = RectifiedFlow(time_sampling="logit_normal", logit_mean=0.3, logit_std=0.7, shift=2.5)
    t = rf.sample_t(33, torch.Generator().manual_seed(1))
    n = torch.randn(33, generator=torch.Generator().manual_seed(1))
    expected = timestep_shift(torch.sigmoid(0.3 + 0.7 * n.double()), 2.5)
    torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-6)


def test_logit_normal_distribution():
    rf = RectifiedFlow(time_sampling="logit_normal", logit_mean=-0.5, logit_std=1.3)
    t = rf.sample_t(40000, torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(1.3, rel=0.02)


@pytest.mark.parametrize("out_mult", [1, 2])
def test_loss_matches_manual_mse(out_mult):
    model = TinyDenoiser(out_mult=out_mult)
    rf = RectifiedFlow(time_scale=500.0)
    z0, z1, t = torch.randn(4, 3, 6, 5), torch.randn(4, 3, 6, 5), torch.rand(4)
    y = torch.randint(0, 5, (4,))
    per_sample = rf.loss(model, z0, {"y": y}, t=t, noise=z1, reduction="none")
    x_seen, t_seen = model.seen[-1]
    zt = (1 - t[:, None, None, None]) * z0 + t[:, None, None, None] * z1
    torch.testing.assert_close(x_seen, zt)
    torch.testing.assert_close(t_seen, t * 500.0)  # the model sees t in model units
    with torch.no_grad():
        pred = model(zt, t * 500.0, y=y)[:, :3].double()
    expected = ((pred - (z1 - z0).double()) ** 2).flatten(1).mean(1)
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rf(model, z0, {"y": y}, t=t, noise=z1), per_sample.mean())


def test_loss_ignores_learned_sigma_channels():
    model = TinyDenoiser(out_mult=2)
    RectifiedFlow().loss(model, torch.randn(3, 3, 4, 4), {"y": torch.tensor([0, 1, 2])}).backward()
    grad = model.conv.weight.grad
    assert grad[:3].abs().sum() > 0
    assert torch.all(grad[3:] == 0)  # the extra (sigma) channels get no gradient from the MSE


def test_loss_is_deterministic_given_generator_or_global_seed():
    model, rf = TinyDenoiser(), RectifiedFlow()
    z0 = torch.randn(6, 3, 4, 4)
    a = rf.loss(model, z0, generator=torch.Generator().manual_seed(7))
    b = rf.loss(model, z0, generator=torch.Generator().manual_seed(7))
    c = rf.loss(model, z0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = rf.loss(model, z0)
    torch.manual_seed(11)
    assert torch.equal(d, rf.loss(model, z0))


def test_loss_with_shift_from_resolution_uses_the_batch_size():
    rf = RectifiedFlow(time_sampling="uniform", shift_base_tokens=4, patch_size=1)
    model = TinyDenoiser()
    rf.loss(model, torch.randn(8, 3, 4, 4), generator=torch.Generator().manual_seed(0))  # 16 tokens -> s = 2
    t = torch.rand(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.seen[-1][1], timestep_shift(t, 2.0) * 1000)


def test_loss_rejects_bad_inputs():
    rf, model = RectifiedFlow(), TinyDenoiser()
    z0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlow(time_sampling="cosine")
    with pytest.raises(ValueError, match="t must have shape"):
        rf.loss(model, z0, t=torch.rand(3))
    with pytest.raises(ValueError, match="noise"):
        rf.loss(model, z0, noise=torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"cond\['y'\]"):
        rf.loss(model, z0, {"y": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="reduction"):
        rf.loss(model, z0, reduction="sum")
    with pytest.raises(ValueError, match="channels"):
        rf.loss(lambda x, t: torch.cat([x, x, x], 1), z0)
    with pytest.raises(ValueError, match="floating-point"):
        rf.loss(model, torch.zeros(2, 3, 4, 4, dtype=torch.long))


def test_training_reduces_the_loss_on_a_fixed_batch():
    """Sanity check that the loss trains a model: a conv net fitted to constant data lowers it clearly."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    rf = RectifiedFlow(time_sampling="uniform")
    z0 = torch.ones(16, 3, 4, 4) * torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    gen = torch.Generator().manual_seed(0)
    eval_loss = lambda: rf.loss(model, z0, generator=torch.Generator().manual_seed(123)).item()  # noqa: E731
    before = eval_loss()
    for _ in range(60):
        opt.zero_grad()
        rf.loss(model, z0, generator=gen).backward()
        opt.step()
    assert eval_loss() < 0.5 * before
    assert math.isfinite(eval_loss())


@pytest.mark.parametrize("gen_device", ["cpu", "same"])
def test_loss_on_device(device, gen_device):
    """A CPU generator works for latents on any device and gives the same loss there as on the CPU."""
    model = TinyDenoiser()
    z0, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3])
    gdev = "cpu" if gen_device == "cpu" else device
    loss = RectifiedFlow().loss(model.to(device), z0.to(device), {"y": y.to(device)},
                                generator=torch.Generator(device=gdev).manual_seed(0))
    assert loss.device.type == device.type and torch.isfinite(loss)
    if gen_device == "cpu":
        ref = RectifiedFlow().loss(model.cpu(), z0, {"y": y}, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-5)

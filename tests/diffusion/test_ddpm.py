import math

import pytest
import torch

from fastdit.diffusion import DDPM, cosine_alpha_bar, cosine_betas, linear_betas


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    d = DDPM("cosine", T)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    clamped = d.betas >= 0.999
    # only the very last step hits the clamp (f(1) = 0 would make beta = 1); before it alpha_bar is the cosine
    assert clamped.nonzero().flatten().tolist() == [T - 1]
    torch.testing.assert_close(d.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    assert d.betas.max().item() == 0.999
    torch.testing.assert_close(d.alphas_cumprod[-1], d.alphas_cumprod[-2] * (1 - 0.999))
    assert d.betas.dtype == torch.float64 and torch.all(d.betas > 0)


def test_cosine_betas_clamp_is_configurable():
    betas = cosine_betas(50, max_beta=0.2)
    raw = 1 - cosine_alpha_bar(torch.arange(1, 51, dtype=torch.float64) / 50) / cosine_alpha_bar(
        torch.arange(0, 50, dtype=torch.float64) / 50)
    torch.testing.assert_close(betas, raw.clamp(max=0.2))
    assert (raw > 0.2).sum() >= 2  # the clamp is exercised
    with pytest.raises(ValueError, match="max_beta"):
        cosine_betas(10, max_beta=1.5)


@pytest.mark.parametrize("T", [1000, 500, 4000])
def test_linear_schedule_is_ddpm_scaled(T):
    betas = linear_betas(T)
    scale = 1000 / T
    expected = torch.tensor([scale * (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=1e-15)
    d = DDPM("linear", T)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - expected, 0))


def test_posterior_variance():
    d = DDPM("linear", 100)
    t = 37
    expected = d.betas[t] * (1 - d.alphas_cumprod[t - 1]) / (1 - d.alphas_cumprod[t])
    torch.testing.assert_close(d.posterior_variance[t], expected)
    assert d.posterior_variance[0] == 0  # x0 is determined at the first step


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_q_sample_closed_form_and_predict_x0(schedule):
    d = DDPM(schedule, 1000)
    z0, eps = torch.randn(6, 4, 5, 3), torch.randn(6, 4, 5, 3)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    xt = d.q_sample(z0, t, eps)
    ab = d.alphas_cumprod[t][:, None, None, None]
    expected = ab.sqrt() * z0.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(xt.double(), expected, rtol=1e-6, atol=1e-6)
    assert xt.dtype == torch.float32
    # x0 from the exact eps, away from the last (nearly pure-noise) steps where 1/sqrt(alpha_bar) is huge
    torch.testing.assert_close(d.predict_x0(xt, t, eps)[:5], z0[:5], rtol=1e-4, atol=2e-4)


def test_loss_matches_manual_mse_and_passes_integer_steps():
    d = DDPM("cosine", 1000)
    seen = {}
    weight = torch.randn(8, 4)

    def model(x, t, y):
        seen["t"] = t
        out = torch.einsum("oc,bchw->bohw", weight, x) + y[:, None, None, None].float()  # (B, 2C, ...): learned sigma
        return out

    z0, eps, t, y = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([5, 250, 999]), torch.arange(3)
    loss = d.loss(model, z0, {"y": y}, t=t, noise=eps, reduction="none")
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [5.0, 250.0, 999.0]
    pred = model(d.q_sample(z0, t, eps), t.float(), y)[:, :4]
    torch.testing.assert_close(loss, ((pred - eps) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(d(model, z0, {"y": y}, t=t, noise=eps), loss.mean())


def test_loss_sampling_is_seeded():
    d = DDPM("linear", 200)
    model = lambda x, t: x * 0.5  # noqa: E731
    z0 = torch.randn(4, 3, 4, 4)
    a = d.loss(model, z0, generator=torch.Generator().manual_seed(1))
    b = d.loss(model, z0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    t = d.sample_t(10000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 199


def test_bad_steps_and_schedule_raise():
    d = DDPM("cosine", 100)
    z0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        d.q_sample(z0, torch.tensor([0, 100]), z0)
    with pytest.raises(ValueError, match="integers"):
        d.q_sample(z0, torch.tensor([0.5, 3.0]), z0)
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(z0, torch.tensor([1, 2, 3]), z0)
    with pytest.raises(ValueError, match="schedule"):
        DDPM("sigmoid")
    with pytest.raises(ValueError, match="num_timesteps"):
        DDPM("linear", 0)


def test_spaced_timesteps():
    d = DDPM("cosine", 1000)
    ts = d.spaced_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert torch.all(torch.diff(ts) < 0)  # strictly descending: no step twice
    assert d.spaced_timesteps(None).tolist() == list(range(999, -1, -1))
    assert d.spaced_timesteps(1).tolist() == [999]
    for n in (2, 3, 7, 333, 999):
        assert len(set(d.spaced_timesteps(n).tolist())) == n
    with pytest.raises(ValueError, match="steps"):
        d.spaced_timesteps(1001)


def test_loss_and_q_sample_on_device(device):
    d = DDPM("cosine", 1000)
    z0, eps, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([0, 400, 999])
    torch.testing.assert_close(d.q_sample(z0.to(device), t.to(device), eps.to(device)).cpu(), d.q_sample(z0, t, eps),
                               rtol=1e-5, atol=1e-6)
    loss = d.loss(lambda x, t: 0.5 * x, z0.to(device), generator=torch.Generator().manual_seed(0))
    ref = d.loss(lambda x, t: 0.5 * x, z0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)

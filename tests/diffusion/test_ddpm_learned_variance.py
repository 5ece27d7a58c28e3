"""DDPM with learned variance (improved DDPM / DiT): the quadratic schedule, the variational-bound pieces against
float64 closed forms, the hybrid loss's stop-gradient, and fastdit's learned-range DDPM sampler against a
step-by-step reference of the official sampler's equations (respaced steps, same noise)."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fastdit.diffusion import (DDPM, DDPMSampler, PerSampleNoise, discretized_gaussian_log_likelihood, normal_kl,
                               quadratic_betas)


@pytest.mark.parametrize("T", [1000, 250, 7])
def test_quadratic_schedule_closed_form(T):
    s = 1000 / T
    lo, hi = math.sqrt(s * 1e-4), math.sqrt(s * 0.02)
    expected = torch.tensor([(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(quadratic_betas(T), expected, rtol=1e-12, atol=1e-15)
    d = DDPM("quadratic", T)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - expected, 0))
    assert quadratic_betas(1).tolist() == [pytest.approx(1e-1)]  # T = 1: b0 = 1e-4 * 1000


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-14


def test_discretized_likelihood_closed_form_and_tails():
    w = 2 / 255
    x = torch.tensor([-1.0, -1 + w, -0.3, 0.0, 0.5, 1 - w, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -1.0, 0.1, 0.0, 0.45, 0.9, 0.7], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.2, 0.05, 0.3, 0.01, 0.1, 0.5, 0.25], dtype=torch.float64))
    n = Normal(mean, log_scale.exp())
    lower_edge, upper_edge = x <= -1 + w / 2, x >= 1 - w / 2
    prob = torch.where(lower_edge, n.cdf(x + w / 2),
                       torch.where(upper_edge, 1 - n.cdf(x - w / 2), n.cdf(x + w / 2) - n.cdf(x - w / 2)))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    torch.testing.assert_close(got, prob.log(), rtol=1e-9, atol=1e-12)
    # far tails: the direct formula underflows to log(0); the log-space one stays finite and ordered
    far = discretized_gaussian_log_likelihood(torch.tensor([0.0, 0.0]), torch.tensor([30.0, -30.0]),
                                              torch.log(torch.tensor([0.5, 0.5])))
    assert torch.isfinite(far).all() and (far < -1000).all()
    assert torch.allclose(far[0], far[1], rtol=1e-5)


def _posterior64(d, z0, x_t, t):
    """The paper's posterior q(x_{t-1} | x_t, x0) written out in float64 (Ho et al. eq. 7)."""
    ab, ab_prev, beta = (v[t].double().reshape(-1, 1, 1, 1) for v in (d.alphas_cumprod, d.alphas_cumprod_prev,
                                                                        d.betas))
    mean = ab_prev.sqrt() * beta / (1 - ab) * z0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    var = beta * (1 - ab_prev) / (1 - ab)
    return mean, var


def test_vlb_terms_match_the_papers_equations_in_float64():
    d = DDPM("linear", 1000, variance="learned_range")
    g = torch.Generator().manual_seed(1)
    B = 4
    z0 = torch.rand(B, 2, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(B, 2, 3, 3, generator=g)
    v = torch.rand(B, 2, 3, 3, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 400, 999])
    noise = torch.randn(B, 2, 3, 3, generator=g)
    x_t = d.q_sample(z0, t, noise)
    got = d.vlb_terms(z0, x_t, t, eps, v)

    z0d, xd, epsd, vd = z0.double(), x_t.double(), eps.double(), v.double()
    ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0_pred = (xd - (1 - ab).sqrt() * epsd) / ab.sqrt()
    true_mean, true_var = _posterior64(d, z0d, xd, t)
    model_mean, _ = _posterior64(d, x0_pred, xd, t)
    beta = d.betas[t].reshape(-1, 1, 1, 1)
    tilde_clipped = torch.where(t.reshape(-1, 1, 1, 1) == 0, d.posterior_variance[1], true_var)
    frac = (vd + 1) / 2
    model_var = torch.exp(frac * beta.log() + (1 - frac) * tilde_clipped.log())
    kl = kl_divergence(Normal(true_mean, true_var.clamp_min(1e-300).sqrt()), Normal(model_mean, model_var.sqrt()))
    n = Normal(model_mean, model_var.sqrt())
    w = 2 / 255
    prob = torch.where(z0d <= -1 + w / 2, n.cdf(z0d + w / 2),
                       torch.where(z0d >= 1 - w / 2, 1 - n.cdf(z0d - w / 2), n.cdf(z0d + w / 2) - n.cdf(z0d - w / 2)))
    want = torch.where(t == 0, -prob.log().flatten(1).mean(1), kl.flatten(1).mean(1))
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-5)


class _Constant(torch.nn.Module):
    """A 'model' whose eps and v outputs are parameters (broadcast over the batch)."""

    def __init__(self, shape):
        super().__init__()
        self.eps = torch.nn.Parameter(torch.randn(shape) * 0.5)
        self.v = torch.nn.Parameter(torch.rand(shape) * 2 - 1)

    def forward(self, x, t, **_):
        return torch.cat([self.eps.expand_as(x), self.v.expand_as(x)], 1)


def test_hybrid_loss_trains_the_variance_and_stops_the_gradient_at_the_mean():
    torch.manual_seed(0)
    model = _Constant((1, 2, 4, 4))
    z0 = torch.rand(3, 2, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 10, 500]), torch.randn(3, 2, 4, 4)

    def grads(diffusion):
        model.zero_grad()
        diffusion.loss(model, z0, t=t, noise=noise).backward()
        return model.eps.grad.clone(), None if model.v.grad is None else model.v.grad.clone()

    simple_eps, simple_v = grads(DDPM("linear", 1000, variance="fixed"))
    hybrid_eps, hybrid_v = grads(DDPM("linear", 1000, variance="learned_range"))
    torch.testing.assert_close(hybrid_eps, simple_eps, rtol=0, atol=0)  # the vlb term does not move the mean
    assert simple_v is None or simple_v.abs().max() == 0
    assert hybrid_v.abs().max() > 0
    # the loss value is L_simple + lambda * T * mean L_t
    d = DDPM("linear", 1000, variance="learned_range", vlb_weight=0.003)
    x_t = d.q_sample(z0, t, noise)
    out = model(x_t, t.float())
    with torch.no_grad():
        want = ((out[:, :2] - noise) ** 2).flatten(1).mean(1) + 0.003 * 1000 * d.vlb_terms(z0, x_t, t, out[:, :2],
                                                                                             out[:, 2:])
        got = d.loss(model, z0, t=t, noise=noise, reduction="none")
    torch.testing.assert_close(got, want)


def test_bad_inputs_name_the_choices():
    with pytest.raises(ValueError, match="learned sigma"):
        DDPM(variance="learned_range").loss(lambda x, t: x * 0, torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="schedule must be one of cosine, linear, quadratic"):
        DDPM("sigmoid")
    with pytest.raises(ValueError, match="variance must be one of fixed, learned_range"):
        DDPM(variance="learned")
    with pytest.raises(ValueError, match="vlb_weight"):
        DDPM(variance="learned_range", vlb_weight=-1)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
        DDPMSampler(DDPM("linear", 100), steps=250)


def _official_respaced_sampler(model, d, steps, noise, cond, noise_source):
    """The official (improved DDPM / DiT) sampler's equations, step by step, on respaced steps: new betas
    1 - ab[t_i] / ab[t_{i-1}] at the kept steps, the model called with the original step index, the learned
    log variance interpolated between log beta and the clipped log posterior variance of the respaced process,
    x0 from eps, the posterior mean, noise on all but the last step."""
    T = d.num_timesteps
    use = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
    ab_all = d.alphas_cumprod.tolist()
    betas, last = [], 1.0
    for i in use:
        betas.append(1 - ab_all[i] / last)
        last = ab_all[i]
    betas = torch.tensor(betas, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * ab_prev.sqrt() / (1 - ab)
    coef2 = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
    x = noise.clone()
    for i in reversed(range(len(use))):
        out = model(x, torch.full((x.shape[0],), float(use[i])), **cond)
        eps, v = out[:, :x.shape[1]], out[:, x.shape[1]:]
        x0 = math.sqrt(1 / ab[i]) * x - math.sqrt(1 / ab[i] - 1) * eps
        mean = float(coef1[i]) * x0 + float(coef2[i]) * x
        frac = (v + 1) / 2
        logvar = frac * math.log(betas[i]) + (1 - frac) * float(post_logvar_clipped[i])
        if i > 0:
            x = mean + torch.exp(0.5 * logvar) * noise_source.randn(x.shape[1:], x.device, x.dtype)
        else:
            x = mean  # the official sampler multiplies this step's noise by 0
    return x


@pytest.mark.parametrize("schedule", ["linear", "quadratic"])
def test_learned_range_sampler_equals_the_official_equations(schedule):
    from fastdit.models import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, learn_sigma=True)).eval()
    with torch.no_grad():  # DiT zero-initialises its output layer: give the variance channels something to say
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = DDPM(schedule, 1000, variance="learned_range")
    B = 3
    cond = {"y": torch.tensor([1, 5, 9])}
    noise = torch.randn(B, 4, 8, 8)
    with torch.no_grad():
        ours = DDPMSampler(d, steps=25, variance="learned_range")(
            model, noise, cond, noise_source=PerSampleNoise.create(B, seed=7), progress=False)
        ref = _official_respaced_sampler(model, d, 25, noise, cond, PerSampleNoise.create(B, seed=7))
    assert torch.isfinite(ours).all()
    # equal to float32 rounding (the two evaluate the same equations in a different order)
    assert (ours - ref).abs().max() <= 2e-6 * ref.abs().max()

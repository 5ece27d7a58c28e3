import pytest
import torch

from fastdit.diffusion import (
    DDIMSampler, DDPM, DDPMSampler, EulerSampler, HeunSampler, RectifiedFlow, flow_timesteps, sample, timestep_shift,
)

MU = torch.tensor([1.0, -2.0, 0.5, 0.0])[:, None, None]
SIGMA = torch.tensor([0.5, 1.5, 0.3, 1.0])[:, None, None]


def test_flow_timesteps():
    ts = flow_timesteps(8)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 9, dtype=torch.float64))
    shifted = flow_timesteps(8, 3.0)
    torch.testing.assert_close(shifted, timestep_shift(ts, 3.0))
    assert shifted[0] == 1 and shifted[-1] == 0
    with pytest.raises(ValueError, match="steps"):
        flow_timesteps(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_follow_the_exact_flow_of_gaussian_data(oracles, shift):
    """With the optimal velocity for N(mu, sigma^2) data, the exact flow maps noise xi to mu + sigma * xi: the
    samplers must converge to it, Euler at first order and Heun at second order."""
    noise = torch.randn(32, 4, 3, 3, dtype=torch.float64)
    errors = {}
    for name in ("euler", "heun"):
        for steps in (10, 20, 40):
            model = oracles.GaussianVelocity(MU, SIGMA)
            x = sample(model, noise.shape, sampler=name, steps=steps, noise=noise, shift=shift,
                       dtype=torch.float64, progress=False)
            errors[name, steps] = (x - model.exact(noise)).abs().max().item()
    for steps in (10, 20, 40):
        assert errors["heun", steps] < errors["euler", steps] / 3  # Heun more accurate at equal steps
    # orders of convergence: halving the step halves Euler's error and quarters Heun's (asymptotically)
    assert 1.6 < errors["euler", 20] / errors["euler", 40] < 2.4
    assert errors["heun", 20] / errors["heun", 40] > 3.0
    assert errors["heun", 40] < 0.02


def test_euler_samples_have_the_data_mean_and_std(oracles):
    model = oracles.GaussianVelocity(MU, SIGMA)
    x = sample(model, (512, 4, 2, 2), sampler="heun", steps=30, seed=0, progress=False)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, MU.flatten(), atol=0.1, rtol=0)
    torch.testing.assert_close(std, SIGMA.flatten(), rtol=0.08, atol=0.01)


def test_flow_samplers_pass_model_time_units(oracles):
    model = oracles.GaussianVelocity(MU, SIGMA, time_scale=1.0)
    sample(model, (2, 4, 2, 2), sampler="euler", steps=4, time_scale=1.0, shift=2.0, seed=0, progress=False)
    expected = timestep_shift(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 2.0)
    torch.testing.assert_close(torch.stack([t[0] for t in model.times]).double(), expected)
    assert all(t.shape == (2,) and t.dtype == torch.float32 for t in model.times)

    model = oracles.GaussianVelocity(MU, SIGMA)
    sampler = HeunSampler(steps=3)
    sampler(model, torch.randn(2, 4, 2, 2), progress=False)
    assert sampler.last_nfe == 6 and [round(t[0].item(), 3) for t in model.times] == [
        1000.0, 666.667, 666.667, 333.333, 333.333, 0.0]


def test_sample_takes_time_scale_and_resolution_shift_from_the_objective(oracles):
    rf = RectifiedFlow(time_scale=10.0, shift_base_tokens=4, patch_size=1)  # 4x4 latents: s = sqrt(16/4) = 2
    model = oracles.GaussianVelocity(MU, SIGMA, time_scale=10.0)
    sample(model, (1, 4, 4, 4), sampler="euler", steps=2, objective=rf, seed=0, progress=False)
    assert [t.item() for t in torch.cat(model.times)] == pytest.approx([10.0, 10 * timestep_shift(0.5, 2.0)])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("sampler, kwargs", [("ddim", {"steps": 10}), ("ddim", {"steps": 25, "eta": 1.0}),
                                             ("ddpm", {"steps": 20})])
def test_discrete_samplers_recover_a_point_mass(oracles, schedule, sampler, kwargs):
    """For data concentrated at mu the exact eps is known; every step then predicts x0 = mu exactly."""
    d = DDPM(schedule, 1000)
    model = oracles.GaussianEps(d, MU, torch.zeros_like(SIGMA))
    x = sample(model, (6, 4, 3, 3), sampler=sampler, objective=d, seed=1, progress=False, **kwargs)
    torch.testing.assert_close(x, MU.expand(6, 4, 3, 3), atol=1e-4, rtol=0)


def test_ddim_eta0_is_deterministic_given_the_noise(oracles):
    d = DDPM("cosine", 1000)
    model = oracles.GaussianEps(d, MU, SIGMA)
    noise = torch.randn(3, 4, 4, 4)
    a = sample(model, noise.shape, sampler="ddim", steps=20, noise=noise, seed=0, objective=d, progress=False)
    b = sample(model, noise.shape, sampler="ddim", steps=20, noise=noise, seed=99, objective=d, progress=False)
    assert torch.equal(a, b)  # no randomness besides the initial noise
    c = sample(model, noise.shape, sampler="ddim", steps=20, eta=1.0, noise=noise, seed=0, objective=d, progress=False)
    e = sample(model, noise.shape, sampler="ddim", steps=20, eta=1.0, noise=noise, seed=99, objective=d,
               progress=False)
    assert not torch.allclose(c, e)  # eta > 0 draws fresh noise at every step


@pytest.mark.parametrize("sampler, kwargs, rtol", [
    ("ddpm", {"steps": 100}, 0.06), ("ddim", {"steps": 50}, 0.06), ("ddim", {"steps": 50, "eta": 1.0}, 0.08),
    pytest.param("ddpm", {"steps": None}, 0.03, marks=pytest.mark.slow)])
def test_discrete_samplers_reproduce_gaussian_data(oracles, sampler, kwargs, rtol):
    d = DDPM("cosine", 1000)
    model = oracles.GaussianEps(d, MU, SIGMA)
    # per-sample generators make each stochastic step cost B small draws: keep B modest, samples large
    x = sample(model, (128, 4, 6, 6), sampler=sampler, objective=d, seed=0, progress=False, **kwargs)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.1, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), SIGMA.flatten(), rtol=rtol, atol=0.01)


def test_ddpm_passes_original_step_indices_when_respaced(oracles):
    d = DDPM("linear", 100)
    model = oracles.GaussianEps(d, MU, SIGMA)
    sampler = DDPMSampler(d, steps=5)
    sampler(model, torch.randn(2, 4, 2, 2), progress=False)
    assert [t[0].item() for t in model.times] == [99.0, 74.0, 50.0, 25.0, 0.0]
    assert all(t.dtype == torch.float32 for t in model.times)


def test_ddpm_learned_range_variance_interpolates_fixed_variances():
    d = DDPM("cosine", 200)
    eps_model = lambda v: (lambda x, t: torch.cat([0.1 * x, torch.full_like(x, v)], 1))  # noqa: E731
    runs = {}
    for name, v, variance in (("large", 1.0, "learned_range"), ("small", -1.0, "learned_range"),
                              ("fixed_large", 0.0, "fixed_large"), ("fixed_small", 0.0, "fixed_small")):
        runs[name] = sample(eps_model(v), (3, 2, 4, 4), sampler="ddpm", steps=20, objective=d, variance=variance,
                            seed=5, progress=False)
    torch.testing.assert_close(runs["large"], runs["fixed_large"])
    torch.testing.assert_close(runs["small"], runs["fixed_small"])
    assert not torch.allclose(runs["large"], runs["small"])
    with pytest.raises(ValueError, match="learned sigma"):
        sample(lambda x, t: x, (1, 2, 4, 4), sampler="ddpm", steps=3, objective=d, variance="learned_range",
               progress=False)


def test_ddpm_clip_x0():
    d = DDPM("cosine", 50)
    model = lambda x, t: -x  # noqa: E731  (drives x0 far outside [-1, 1])
    x = sample(model, (2, 1, 4, 4), sampler="ddim", steps=5, objective=d, clip_x0=1.0, seed=0, progress=False)
    assert x.abs().max() <= 1.0 + 1e-5


class TestSeeding:
    @pytest.mark.parametrize("sampler", ["euler", "ddpm", "ddim"])
    def test_same_seed_same_samples_in_any_batch_size(self, oracles, sampler):
        d = DDPM("linear", 100)
        model = oracles.GaussianEps(d, MU, SIGMA) if sampler != "euler" else oracles.GaussianVelocity(MU, SIGMA)
        kw = dict(sampler=sampler, steps=10, progress=False, objective=d if sampler != "euler" else None,
                  eta=1.0 if sampler == "ddim" else 0.0)
        small = sample(model, (2, 4, 3, 3), seed=123, **kw)
        again = sample(model, (2, 4, 3, 3), seed=123, **kw)
        big = sample(model, (5, 4, 3, 3), seed=123, **kw)
        other = sample(model, (2, 4, 3, 3), seed=124, **kw)
        assert torch.equal(small, again)
        torch.testing.assert_close(big[:2], small, rtol=1e-6, atol=1e-6)  # stochastic steps included
        assert not torch.allclose(small, other)
        assert not torch.allclose(big[0], big[1])

    def test_generator_and_explicit_seeds(self, oracles):
        model = oracles.GaussianVelocity(MU, SIGMA)
        kw = dict(steps=2, progress=False)
        a = sample(model, (3, 4, 2, 2), generator=torch.Generator().manual_seed(5), **kw)
        b = sample(model, (3, 4, 2, 2), generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(a, b)
        assert torch.equal(sample(model, (3, 4, 2, 2), seed=5, **kw), a)  # an int seed is a fresh generator's seed
        c = sample(model, (2, 4, 2, 2), seed=[10, 11], **kw)
        d = sample(model, (2, 4, 2, 2), seed=[11, 10], **kw)
        torch.testing.assert_close(c.flip(0), d)
        with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
            sample(model, (3, 4, 2, 2), seed=[1, 2], **kw)
        with pytest.raises(ValueError, match="either seed or generator"):
            sample(model, (3, 4, 2, 2), seed=1, generator=torch.Generator(), **kw)

    def test_global_rng_is_used_without_seed(self, oracles):
        model = oracles.GaussianVelocity(MU, SIGMA)
        torch.manual_seed(3)
        a = sample(model, (2, 4, 2, 2), steps=2, progress=False)
        torch.manual_seed(3)
        assert torch.equal(a, sample(model, (2, 4, 2, 2), steps=2, progress=False))


def test_progress_bar_can_be_disabled(capsys):
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sample(model, (1, 1, 2, 2), steps=3, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    sample(model, (1, 1, 2, 2), steps=3, seed=0, progress=True)
    assert "euler" in capsys.readouterr().err


def test_sample_rejects_bad_arguments():
    model = lambda x, t, **k: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(model, (1, 4, 2, 2), sampler="dpm++")
    with pytest.raises(ValueError, match="shape"):
        sample(model, (4, 2), progress=False)
    with pytest.raises(ValueError, match="noise has shape"):
        sample(model, (1, 4, 2, 2), noise=torch.randn(1, 4, 2, 3), progress=False)
    with pytest.raises(ValueError, match="DDPM objective"):
        sample(model, (1, 4, 2, 2), sampler="ddim", objective=RectifiedFlow(), progress=False)
    with pytest.raises(ValueError, match="rectified flow"):
        sample(model, (1, 4, 2, 2), sampler="euler", objective=DDPM(), progress=False)
    with pytest.raises(ValueError, match="shift and time_scale"):
        sample(model, (1, 4, 2, 2), sampler="ddpm", shift=3.0, progress=False)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-1)
    with pytest.raises(ValueError, match="variance"):
        DDPMSampler(variance="learned")
    with pytest.raises(ValueError, match="steps"):
        EulerSampler(steps=0)
    with pytest.raises(ValueError, match="steps"):
        sample(model, (1, 4, 2, 2), sampler="heun", steps=None, progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(model, (1, 4, 2, 2), sampler="ddpm", steps=2.5, progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(model, (1, 4, 2, 2), sampler="ddim", steps=2000, progress=False)


@pytest.mark.parametrize("sampler", ["heun", "ddpm"])
def test_samples_do_not_depend_on_the_device(oracles, device, sampler):
    """Noise is drawn on the CPU per sample, so a model on the GPU gives the CPU's samples (up to arithmetic)."""
    d = DDPM("cosine", 100)

    class Net(torch.nn.Module):  # a module, so that sample() finds the device from its parameters
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t, y):
            return self.scale * x + torch.cos(t / 50)[:, None, None, None] + y[:, None, None, None] * 0.1

    torch.manual_seed(0)
    net = Net()
    y = torch.tensor([1, 2, 3])
    kw = dict(sampler=sampler, steps=6, objective=d if sampler == "ddpm" else None, seed=7, progress=False,
              cfg_scale=2.0)
    ref = sample(net, (3, 4, 4, 4), {"y": y}, {"y": torch.zeros_like(y)}, **kw)
    out = sample(net.to(device), (3, 4, 4, 4), {"y": y.to(device)}, {"y": torch.zeros_like(y).to(device)}, **kw)
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    gen = torch.Generator(device=device).manual_seed(3)
    again = sample(net, (3, 4, 4, 4), {"y": y.to(device)}, {"y": torch.zeros_like(y).to(device)},
                   **{**kw, "seed": None}, generator=gen)
    gen = torch.Generator(device=device).manual_seed(3)
    torch.testing.assert_close(again, sample(net, (3, 4, 4, 4), {"y": y.to(device)},
                                             {"y": torch.zeros_like(y).to(device)}, **{**kw, "seed": None},
                                             generator=gen))

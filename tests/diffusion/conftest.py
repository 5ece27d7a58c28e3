"""Denoisers with closed-form answers, for sampler tests.

For data z0 ~ N(mu, sigma^2) (elementwise; mu, sigma broadcast over (C, H, W)) the best possible predictions are
known in closed form, so a sampler fed with them must reproduce the data distribution:

- rectified flow, z_t = (1-t) z0 + t z1: E[z1 - z0 | z_t] = (t - (1-t) sigma^2) / V * (z_t - (1-t) mu) - mu with
  V = (1-t)^2 sigma^2 + t^2. Its flow maps noise xi at t = 1 to exactly mu + sigma * xi at t = 0.
- DDPM, x_t = sqrt(ab) z0 + sqrt(1-ab) eps: E[eps | x_t] = sqrt(1-ab) / (ab sigma^2 + 1 - ab) * (x_t - sqrt(ab) mu).
  With sigma = 0 (a point mass) this is the exact eps, and x0 = mu is recovered from any x_t.
"""
from types import SimpleNamespace

import pytest
import torch


class GaussianVelocity:
    """The optimal rectified-flow velocity for N(mu, sigma^2) data; records the model times it is called with."""

    def __init__(self, mu, sigma, time_scale=1000.0):
        self.mu, self.sigma, self.time_scale = mu, sigma, time_scale
        self.times = []

    def __call__(self, x, t, **cond):
        self.times.append(t.clone())
        s = (t.double() / self.time_scale).reshape(-1, *([1] * (x.dim() - 1)))
        mu = torch.as_tensor(self.mu, dtype=torch.float64)
        var = torch.as_tensor(self.sigma, dtype=torch.float64) ** 2
        V = (1 - s) ** 2 * var + s ** 2
        return ((s - (1 - s) * var) / V * (x.double() - (1 - s) * mu) - mu).to(x.dtype)

    def exact(self, noise):
        """Where the exact flow takes noise (at t = 1) to at t = 0."""
        return torch.as_tensor(self.mu, dtype=noise.dtype) + torch.as_tensor(self.sigma, dtype=noise.dtype) * noise


class GaussianEps:
    """The optimal epsilon for N(mu, sigma^2) data under a DDPM schedule; t are step indices."""

    def __init__(self, diffusion, mu, sigma):
        self.diffusion, self.mu, self.sigma = diffusion, mu, sigma
        self.times = []

    def __call__(self, x, t, **cond):
        self.times.append(t.clone())
        ab = self.diffusion.alphas_cumprod[t.long().cpu()].reshape(-1, *([1] * (x.dim() - 1))).to(x.device)
        mu = torch.as_tensor(self.mu, dtype=torch.float64)
        var = torch.as_tensor(self.sigma, dtype=torch.float64) ** 2
        return ((1 - ab).sqrt() / (ab * var + 1 - ab) * (x.double() - ab.sqrt() * mu)).to(x.dtype)


@pytest.fixture
def oracles():
    return SimpleNamespace(GaussianVelocity=GaussianVelocity, GaussianEps=GaussianEps)

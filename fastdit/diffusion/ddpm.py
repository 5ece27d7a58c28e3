"""DDPM (Ho et al. 2020) with the linear and cosine (Nichol & Dhariwal 2021) noise schedules, epsilon target.

Discrete steps ``t = 0 .. T-1`` (0 = least noise):

    x_t = sqrt(alpha_bar_t) * z0 + sqrt(1 - alpha_bar_t) * eps,    alpha_bar_t = prod_{i <= t} (1 - beta_i)

The model is given the step index ``t`` as a float and predicts eps. Schedules are computed in float64 (the
products of a thousand factors near 1 lose digits in float32) and cast where they are used.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastdit.diffusion._common import Cond, check_cond, check_latents, rand_on, reduce_loss, split_prediction

SCHEDULES = ("cosine", "linear")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule, (T,) float64: beta from 1e-4 to 0.02 for T = 1000, both ends scaled by
    ``1000 / T`` so that other T keep roughly the same total noise (as improved DDPM does)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """The cosine schedule's ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)`` for u = t / T in [0, 1] (unnormalised:
    alpha_bar_t = f((t + 1) / T) / f(0) until the beta clamp bites)."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, (T,) float64: ``beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)``.

    The clamp keeps the last steps (where f -> 0 and beta -> 1) from being singular.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0 < max_beta <= 1:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(u, s)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as (B, 1, 1, ...) in like's dtype and device."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class DDPM:
    """A discrete Gaussian diffusion with epsilon prediction.

    Args:
        schedule: ``"cosine"`` (s = 0.008, betas clamped to <= ``max_beta``) or ``"linear"``.
        num_timesteps: T.
        cosine_s, max_beta: the cosine schedule's offset and clamp.

    Attributes (float64, CPU, shape (T,)): ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev`` (1 before the
    first step), ``posterior_variance`` (beta-tilde of q(x_{t-1} | x_t, x0)).

    ``loss(model, z0, cond)`` (or calling the object) is the MSE between the model's eps and the true noise;
    a DiT with learned sigma (2C output channels) is trained on its first C channels only: the extra
    channels get no gradient here (DiT's hybrid variational-bound term is not implemented), so sample such
    a model with a fixed variance, or with ``variance="learned_range"`` only if they were trained elsewhere.
    """

    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000, *, cosine_s: float = 0.008,
                 max_beta: float = 0.999):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.num_timesteps = int(num_timesteps)
        if schedule == "cosine":
            self.betas = cosine_betas(self.num_timesteps, cosine_s, max_beta)
        else:
            self.betas = linear_betas(self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    def __repr__(self):
        return f"DDPM(schedule={self.schedule!r}, num_timesteps={self.num_timesteps})"

    # -- time ---------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Training steps, (batch,) int64 uniform in [0, T)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if generator is None:
            return torch.randint(0, self.num_timesteps, (batch,), device=device)
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                             device=generator.device).to(device)

    @staticmethod
    def model_time(t: torch.Tensor) -> torch.Tensor:
        """Step indices -> what the model is given: the same integers as float32."""
        return t.float()

    def _check_t(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("DDPM steps must be integers in [0, T)")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"DDPM steps must be in [0, {self.num_timesteps}), got [{int(t.min())}, {int(t.max())}]")
        return t.long()

    # -- forward process ----------------------------------------------------------------------------------
    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise``; z0, noise: (B, ...); t: (B,) ints."""
        t = self._check_t(t, z0.shape[0])
        a = self.alphas_cumprod
        return _gather(a.sqrt(), t, z0) * z0 + _gather((1 - a).sqrt(), t, z0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample given eps: ``x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``."""
        a = self.alphas_cumprod
        return (x_t - _gather((1 - a).sqrt(), t, x_t) * eps) / _gather(a.sqrt(), t, x_t)

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, model: Callable[..., torch.Tensor], z0: torch.Tensor, cond: Cond = None,
             generator: Optional[torch.Generator] = None, *, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """The training loss ``mean ||model(x_t, float(t), **cond)[:, :C] - eps||^2``.

        Args:
            model: denoiser ``model(x, t, **cond)`` returning (B, C, ...) or (B, 2C, ...) (learned sigma: only
                the first C channels enter the loss).
            z0: (B, C, H, W) clean latents.
            cond: keyword arguments for the model (tensors with batch size B).
            generator: draws t and eps (on the generator's device); the global RNG of z0's device when None.
            t: optional (B,) integer steps instead of sampling; noise: optional eps instead of sampling.
            reduction: ``"mean"`` -> a scalar; ``"none"`` -> (B,) per-sample losses.
        """
        check_latents(z0)
        B = z0.shape[0]
        cond = check_cond(cond, B)
        t = self.sample_t(B, generator, z0.device) if t is None else self._check_t(t, B).to(z0.device)
        if noise is None:
            noise = rand_on(generator, z0.shape, z0.device, dtype=torch.float32).to(z0.dtype)
        elif noise.shape != z0.shape:
            raise ValueError(f"noise must have z0's shape {tuple(z0.shape)}, got {tuple(noise.shape)}")
        x_t = self.q_sample(z0, t, noise)
        pred, _ = split_prediction(model(x_t, self.model_time(t), **cond), z0)
        return reduce_loss(F.mse_loss(pred.float(), noise.float(), reduction="none"), reduction)

    __call__ = loss

    # -- sampling helpers ---------------------------------------------------------------------------------
    def spaced_timesteps(self, steps: Optional[int] = None) -> torch.Tensor:
        """``steps`` step indices evenly spread over [0, T - 1], both ends included, in descending order
        (int64). ``None`` or T -> every step."""
        T = self.num_timesteps
        if steps is None:
            steps = T
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}] for a {T}-step DDPM, got {steps!r}")
        if steps == 1:
            return torch.tensor([T - 1])
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        return ts.flip(0)

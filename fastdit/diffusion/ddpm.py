"""DDPM (Ho et al. 2020) with the linear, quadratic and cosine (Nichol & Dhariwal 2021) noise schedules, epsilon
target, and improved DDPM's learned variance trained with the hybrid loss (L_simple + lambda * L_vlb).

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

SCHEDULES = ("cosine", "linear", "quadratic")
VARIANCES = ("fixed", "learned_range")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule, (T,) float64: beta from 1e-4 to 0.02 for T = 1000, both ends scaled by
    ``1000 / T`` so that other T keep roughly the same total noise (as improved DDPM does)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int) -> torch.Tensor:
    """The quadratic ("scaled linear") schedule, (T,) float64: ``beta_i = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) *
    i / (T - 1))^2`` for i = 0 .. T-1, i.e. linear in sqrt(beta), with the linear schedule's ends
    ``b0 = 1e-4 * 1000 / T`` and ``b1 = 0.02 * 1000 / T`` (T = 1 gives ``b0``)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(math.sqrt(scale * 1e-4), math.sqrt(scale * 0.02), num_timesteps, dtype=torch.float64) ** 2


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:
    ``(logvar2 - logvar1 + (e^logvar1 + (mean1 - mean2)^2) / e^logvar2 - 1) / 2``."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bin_width: float = 2.0 / 255) -> torch.Tensor:
    """log P(x) per element, in nats, for data on a grid of ``bin_width`` in [-1, 1] under N(mean, e^(2 log_scale))
    (Ho et al. 2020, eq. 13): the Gaussian mass of the bin ``[x - w/2, x + w/2]``, with the bins at the ends
    extended to -inf (x <= -1 + w/2) and +inf (x >= 1 - w/2). Exact normal CDF (``torch.special``), in log
    space for the tails. (The official improved-DDPM code uses a tanh approximation of the CDF.)"""
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + bin_width / 2) * inv_std
    lower = (x - mean - bin_width / 2) * inv_std
    # the bin's mass Phi(upper) - Phi(lower), in log space: mirrored (S(l) - S(u) = Phi(-l) - Phi(-u)) when the
    # bin lies above the mean, so the larger CDF value is never near 1, and log(-expm1(.)) keeps a narrow bin's
    # small difference exact. Every branch stays finite, so torch.where passes no NaN gradient.
    flip = lower > 0
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    mid = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    edge = 1 - bin_width / 2
    return torch.where(x <= -edge, torch.special.log_ndtr(upper),
                       torch.where(x >= edge, torch.special.log_ndtr(-lower), mid))


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
        schedule: ``"cosine"`` (s = 0.008, betas clamped to <= ``max_beta``), ``"linear"`` or ``"quadratic"``
            (see :func:`quadratic_betas`).
        num_timesteps: T.
        cosine_s, max_beta: the cosine schedule's offset and clamp.
        variance: ``"fixed"`` (the model predicts eps only; samplers pick a fixed variance) or
            ``"learned_range"`` (improved DDPM / DiT: a model with learned sigma returns 2C channels, eps and v;
            the variance of p(x_{t-1} | x_t) is ``exp(frac log beta_t + (1 - frac) log beta-tilde_t)``,
            ``frac = (v + 1) / 2``, trained by the variational bound).
        vlb_weight: lambda of the hybrid loss (learned_range only), see :meth:`loss`.

    Attributes (float64, CPU, shape (T,)): ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev`` (1 before the
    first step), ``posterior_variance`` (beta-tilde of q(x_{t-1} | x_t, x0)), ``posterior_log_variance_clipped``
    (its log with step 0's value, 0, replaced by step 1's), ``posterior_mean_coef1/2`` (the posterior mean is
    ``coef1 * x0 + coef2 * x_t``).

    ``loss(model, z0, cond)`` (or calling the object): the MSE between the model's eps and the true noise, plus
    with ``variance="learned_range"`` the variational-bound term of improved DDPM (the hybrid loss).
    """

    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000, *, cosine_s: float = 0.008,
                 max_beta: float = 0.999, variance: str = "fixed", vlb_weight: float = 0.001):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
        if not (isinstance(vlb_weight, (int, float)) and vlb_weight >= 0 and math.isfinite(vlb_weight)):
            raise ValueError(f"vlb_weight must be a number >= 0, got {vlb_weight!r}")
        self.schedule, self.variance, self.vlb_weight = schedule, variance, float(vlb_weight)
        self.num_timesteps = int(num_timesteps)
        if schedule == "cosine":
            self.betas = cosine_betas(self.num_timesteps, cosine_s, max_beta)
        elif schedule == "quadratic":
            self.betas = quadratic_betas(self.num_timesteps)
        else:
            self.betas = linear_betas(self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else
                                                        self.betas.clone())
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)

    def __repr__(self):
        extra = f", variance={self.variance!r}, vlb_weight={self.vlb_weight:g}" if self.variance != "fixed" else ""
        return f"DDPM(schedule={self.schedule!r}, num_timesteps={self.num_timesteps}{extra})"

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

    # -- posterior and the variational bound ----------------------------------------------------------------
    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log variance of q(x_{t-1} | x_t, x0): ``coef1 x0 + coef2 x_t`` and log beta-tilde (clipped)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_log_variance_clipped, t, x_t)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """learned_range: ``frac log beta_t + (1 - frac) log beta-tilde_t`` with ``frac = (v + 1) / 2``."""
        frac = (v + 1) / 2
        return frac * _gather(self.betas.log(), t, v) + (1 - frac) * _gather(self.posterior_log_variance_clipped, t, v)

    def vlb_terms(self, z0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
        """L_t of the variational bound per sample, (B,), in nats per dimension (mean over C, H, W):
        ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for t > 0, and the discretised decoder's
        ``-log p(x0 | x_1)`` at t = 0 (:func:`discretized_gaussian_log_likelihood`). p's mean comes from ``eps``
        (pass it detached for the hybrid loss) and its variance from ``v`` (learned_range). float32 math."""
        z0, x_t, eps, v = z0.float(), x_t.float(), eps.float(), v.float()
        x0_pred = self.predict_x0(x_t, t, eps)
        true_mean, true_logvar = self.q_posterior(z0, x_t, t)
        model_mean, _ = self.q_posterior(x0_pred, x_t, t)
        model_logvar = self.model_log_variance(v, t)
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(z0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl)

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, model: Callable[..., torch.Tensor], z0: torch.Tensor, cond: Cond = None,
             generator: Optional[torch.Generator] = None, *, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """The training loss.

        ``variance="fixed"``: ``mean ||eps_model - eps||^2`` (L_simple). A model with learned sigma (2C output
        channels) is trained on its first C channels only here: use ``variance="learned_range"`` to train the
        others.

        ``variance="learned_range"``: the hybrid loss of improved DDPM, ``L_simple + vlb_weight * T * L_t``, where
        L_t (:meth:`vlb_terms`, nats/dim) sees eps detached (stop-gradient on the mean: the vlb term trains the
        variance only) and ``T * L_t`` is the one-sample estimate of the whole bound L_vlb = sum_t L_t at a
        uniform t. With T = 1000 and the default lambda = 0.001 this is ``L_simple + L_t`` in nats; the official
        DiT / improved-DDPM code adds L_t in bits (``vlb_weight = 1 / (1000 ln 2)`` reproduces it).

        Args:
            model: denoiser ``model(x, t, **cond)`` returning (B, C, ...) or (B, 2C, ...).
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
        pred, extra = split_prediction(model(x_t, self.model_time(t), **cond), z0)
        per_element = F.mse_loss(pred.float(), noise.float(), reduction="none")
        if self.variance == "fixed":
            return reduce_loss(per_element, reduction)
        if extra is None:
            raise ValueError("variance='learned_range' needs a model with learned sigma (2C output channels, e.g. "
                             "DiT with learn_sigma=True); use variance='fixed' for an eps-only model")
        per_sample = per_element.flatten(1).mean(1)
        vlb = self.vlb_terms(z0, x_t, t, pred.detach(), extra)
        per_sample = per_sample + self.vlb_weight * self.num_timesteps * vlb
        return reduce_loss(per_sample[:, None], reduction)

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

"""Diffusion objectives and samplers for DiT-family denoisers.

A denoiser is any callable ``model(x, t, **cond) -> Tensor`` with x (B, C, H, W) latents and t (B,) float
times in the objective's model units (rectified flow: ``t * time_scale``; DDPM: the step index). A
(B, 2C, H, W) output (DiT with learned sigma) carries the prediction in its first C channels.

- :class:`RectifiedFlow`: ``z_t = (1-t) z0 + t z1``, velocity target ``z1 - z0``, uniform or logit-normal t,
  SD3's timestep shift; :class:`DDPM`: cosine / linear schedules, epsilon target.
- Samplers: :class:`EulerSampler`, :class:`HeunSampler` (rectified flow), :class:`DDPMSampler`,
  :class:`DDIMSampler` (epsilon), all with classifier-free guidance over every channel and an optional
  guidance interval; :func:`sample` is the one-call entry point.

Only torch (and tqdm for progress bars) is needed here.
"""
from fastdit.diffusion.ddpm import (DDPM, cosine_alpha_bar, cosine_betas, discretized_gaussian_log_likelihood,
                                   linear_betas, normal_kl, quadratic_betas)
from fastdit.diffusion.guidance import GuidedDenoiser
from fastdit.diffusion.noise import PerSampleNoise
from fastdit.diffusion.rectified_flow import RectifiedFlow, resolution_shift, timestep_shift
from fastdit.diffusion.samplers import (
    SAMPLERS, DDIMSampler, DDPMSampler, EulerSampler, HeunSampler, Sampler, flow_timesteps, sample,
)

__all__ = [
    "DDPM", "cosine_alpha_bar", "cosine_betas", "linear_betas", "quadratic_betas", "normal_kl",
    "discretized_gaussian_log_likelihood", "GuidedDenoiser", "PerSampleNoise",
    "RectifiedFlow", "resolution_shift", "timestep_shift", "SAMPLERS", "Sampler", "EulerSampler", "HeunSampler",
    "DDPMSampler", "DDIMSampler", "flow_timesteps", "sample",
]

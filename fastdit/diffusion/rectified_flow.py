"""Rectified flow (Liu et al. 2022; as trained in SD3, Esser et al. 2024): straight paths from data to noise.

Time runs from t = 0 (data) to t = 1 (noise):

    z_t = (1 - t) * z0 + t * z1,      z1 ~ N(0, I)
    target velocity  v = dz_t / dt = z1 - z0

The model is trained with a plain MSE on v and sees ``t * time_scale`` (1000 by default: the range DiT's
sinusoidal timestep embedding was designed for). Sampling integrates dz/dt = v from t = 1 to t = 0
(:mod:`fastdit.diffusion.samplers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fastdit.diffusion._common import Cond, check_cond, check_latents, rand_on, reduce_loss, split_prediction

TIME_SAMPLINGS = ("uniform", "logit_normal")


def timestep_shift(t: torch.Tensor, shift: Union[float, torch.Tensor]) -> torch.Tensor:
    """SD3's timestep shift ``t' = s t / (1 + (s - 1) t)``, elementwise.

    t: any shape, values in [0, 1]; shift: s > 0 (a float, or a tensor broadcastable to t).
    The map keeps 0 and 1 fixed and divides the signal-to-noise ratio ``((1 - t) / t)^2`` by ``s^2`` at every
    t. s > 1 spends more of training (and of the sampling steps) at high noise, which larger images need:
    with more pixels, the same per-pixel noise level still leaves the coarse structure recognisable.
    """
    if isinstance(shift, (int, float)):
        if not shift > 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        if shift == 1:
            return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """The shift for an image of ``num_tokens`` tokens when ``base_tokens`` is the reference size:
    ``s = sqrt(num_tokens / base_tokens)`` (SD3, section 5.3.2: matching the noise level of a ``base``-sized
    image means scaling the noise-to-signal ratio with the square root of the number of values).

    256 tokens is a 256 px image through an 8x VAE and 2x2 patches; SD3 uses 3.0 at 1024 px where this gives 4.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"num_tokens and base_tokens must be positive, got {num_tokens} and {base_tokens}")
    return math.sqrt(num_tokens / base_tokens)


@dataclass
class RectifiedFlow:
    """The rectified-flow training objective and its time conventions.

    Args:
        time_sampling: ``"uniform"`` (t ~ U[0, 1)) or ``"logit_normal"`` (t = sigmoid(n), n ~ N(logit_mean,
            logit_std^2); SD3's best setting is (0, 1): more weight on the middle of the path).
        logit_mean, logit_std: parameters of the logit-normal.
        shift: timestep shift ``s`` applied after sampling t (1.0 = none), see :func:`timestep_shift`.
        shift_base_tokens: if set, the shift is derived from each batch's latent size instead:
            ``s = sqrt(tokens / shift_base_tokens)`` with ``tokens = (H / patch_size) * (W / patch_size)``.
        patch_size: the model's patch size, used only to count tokens for ``shift_base_tokens``.
        time_scale: the model sees ``t * time_scale``.

    ``loss(model, z0, cond)`` (or calling the object) returns the MSE between the model's velocity and
    ``z1 - z0``; see :meth:`loss`.
    """

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    shift_base_tokens: Optional[int] = None
    patch_size: int = 2
    time_scale: float = 1000.0

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.shift_base_tokens is not None and self.shift_base_tokens <= 0:
            raise ValueError(f"shift_base_tokens must be positive or None, got {self.shift_base_tokens}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")

    # -- time ---------------------------------------------------------------------------------------------
    def shift_for(self, spatial_shape: Optional[Sequence[int]] = None) -> float:
        """The timestep shift for latents of spatial size ``(H, W)``: ``shift``, or the resolution-dependent
        one when ``shift_base_tokens`` is set (then ``spatial_shape`` is required)."""
        if self.shift_base_tokens is None:
            return float(self.shift)
        if spatial_shape is None:
            raise ValueError("shift_base_tokens is set: the latent spatial shape (H, W) is needed to derive the shift")
        tokens = 1
        for size in spatial_shape:
            tokens *= max(1, int(size) // self.patch_size)
        return resolution_shift(tokens, self.shift_base_tokens)

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None, device=None,
                 spatial_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Training times, (batch,) float32 in [0, 1]: drawn per ``time_sampling``, then shifted."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self.time_sampling == "uniform":
            t = rand_on(generator, (batch,), device, kind="rand")
        else:
            n = rand_on(generator, (batch,), device, kind="randn")
            t = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return timestep_shift(t, self.shift_for(spatial_shape))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """t in [0, 1] -> what the model is given (``t * time_scale``)."""
        return t * self.time_scale

    # -- path ---------------------------------------------------------------------------------------------
    @staticmethod
    def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t = (1 - t) z0 + t z1``; z0, z1: (B, ...); t: (B,) (broadcast over the other dims)."""
        t = t.to(z0.dtype).reshape(-1, *([1] * (z0.dim() - 1)))
        return (1 - t) * z0 + t * z1

    @staticmethod
    def target(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """The velocity the model learns: ``dz_t / dt = z1 - z0``."""
        return z1 - z0

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, model: Callable[..., torch.Tensor], z0: torch.Tensor, cond: Cond = None,
             generator: Optional[torch.Generator] = None, *, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """The training loss ``mean ||model(z_t, t * time_scale, **cond) - (z1 - z0)||^2``.

        Args:
            model: denoiser ``model(x, t, **cond)``; a (B, 2C, ...) output (learned sigma) is cut to its first
                C channels: the extra channels get no gradient from this loss.
            z0: (B, C, H, W) clean latents.
            cond: keyword arguments for the model (tensors with batch size B), e.g. ``{"y": labels}``.
            generator: draws t and z1 (on the generator's device); the global RNG of z0's device when None.
                The same generator state (or global seed) gives the same loss.
            t: optional (B,) times in [0, 1] to use instead of sampling (no shift is applied to them).
            noise: optional (B, C, H, W) z1 to use instead of sampling.
            reduction: ``"mean"`` -> a scalar; ``"none"`` -> (B,) per-sample losses.

        The squared error is computed in float32 whatever the model's dtype.
        """
        check_latents(z0)
        B = z0.shape[0]
        cond = check_cond(cond, B)
        if t is None:
            t = self.sample_t(B, generator, z0.device, spatial_shape=z0.shape[2:])
        elif t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if noise is None:
            noise = rand_on(generator, z0.shape, z0.device, dtype=torch.float32).to(z0.dtype)
        elif noise.shape != z0.shape:
            raise ValueError(f"noise must have z0's shape {tuple(z0.shape)}, got {tuple(noise.shape)}")
        t = t.to(z0.device, torch.float32)
        z_t = self.interpolate(z0, noise, t)
        pred, _ = split_prediction(model(z_t, self.model_time(t), **cond), z0)
        err = F.mse_loss(pred.float(), self.target(z0, noise).float(), reduction="none")
        return reduce_loss(err, reduction)

    __call__ = loss

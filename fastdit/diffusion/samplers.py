"""Samplers: Euler and Heun for rectified flow; DDPM ancestral and DDIM for epsilon models. All take
classifier-free guidance over every latent channel (:mod:`fastdit.diffusion.guidance`), are batched, seeded
per sample (:mod:`fastdit.diffusion.noise`) and show a tqdm progress bar (``progress=False`` turns it off).

The one-call entry point is :func:`sample`; the sampler objects underneath can be built once and reused::

    x = sample(dit, (8, 4, 32, 32), cond={"y": labels}, uncond={"y": torch.full_like(labels, 1000)},
               cfg_scale=4.0, sampler="heun", steps=25, seed=0)

The integration runs in float32 (or the ``dtype`` asked for) whatever dtype the model computes in.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from fastdit.diffusion.compiled import CompiledDenoiser
from fastdit.diffusion.ddpm import DDPM
from fastdit.diffusion.guidance import GuidedDenoiser
from fastdit.diffusion.noise import PerSampleNoise
from fastdit.diffusion.rectified_flow import RectifiedFlow, timestep_shift
from fastdit.diffusion._common import Cond

SAMPLERS = ("euler", "heun", "ddpm", "ddim")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 (noise) to 0 (data): uniform in t, then :func:`timestep_shift`-ed."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return timestep_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), float(shift))


class Sampler:
    """Base class: ``sampler(model, noise, cond, uncond, cfg_scale, ...)`` maps (B, C, H, W) noise to samples.

    Common arguments of ``__call__``:
        model: the denoiser ``model(x, t, **cond)``; it runs under ``torch.no_grad()``.
        noise: (B, C, H, W) initial noise (the state at pure noise).
        cond / uncond: model keyword arguments of the conditional / unconditional calls.
        cfg_scale: guidance scale (1 = none: the unconditional model is not called).
        guidance_interval: optional ``(t_lo, t_hi)`` in normalised time (1 = noise, 0 = data).
        noise_source: a :class:`PerSampleNoise` for the stochastic samplers' later draws (made from torch's
            global RNG when None).
        progress: show a tqdm progress bar.
        compile: run each step's model work through compiled graphs (:class:`CompiledDenoiser`: static
            shapes, CUDA graphs on CUDA) instead of eagerly.

    After a call, ``last_nfe`` is the number of model calls it made (a batched cond + uncond call counts once).
    """

    name = "sampler"
    stochastic = False

    def _steps(self, x, denoiser, noise_source, progress):  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, model: Callable[..., torch.Tensor], noise: torch.Tensor, cond: Cond = None,
                 uncond: Cond = None, cfg_scale: float = 1.0, guidance_interval: Optional[Sequence[float]] = None,
                 noise_source: Optional[PerSampleNoise] = None, progress: bool = True,
                 compile: bool = False) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 3:
            raise ValueError("noise must be a floating-point (B, C, ...) tensor")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        trim = getattr(model, "trim_conditioning", None)  # e.g. MMDiT: caption padding cut once, not per step
        if callable(trim):
            cond, uncond = trim(cond, uncond)
        denoiser = (CompiledDenoiser if compile else GuidedDenoiser)(model, cond, uncond, cfg_scale, guidance_interval)
        if self.stochastic and noise_source is None:
            noise_source = PerSampleNoise.create(noise.shape[0])
        if noise_source is not None and noise_source.batch_size != noise.shape[0]:
            raise ValueError(f"noise_source has {noise_source.batch_size} samples, noise {noise.shape[0]}")
        self.last_nfe = 0
        out = self._steps(noise.clone(), denoiser, noise_source, progress)
        self.last_nfe = denoiser.calls
        return out

    @staticmethod
    def _time(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((x.shape[0],), value, device=x.device, dtype=torch.float32)


class EulerSampler(Sampler):
    """First-order integration of the rectified-flow ODE ``dz/dt = v(z, t)`` from t = 1 to t = 0.

    Args:
        steps: number of steps (= model calls).
        shift: timestep shift of the step grid (SD3's; 1 = uniform steps).
        time_scale: the model sees ``t * time_scale``.
    """

    name = "euler"

    def __init__(self, steps: int = 50, shift: float = 1.0, time_scale: float = 1000.0):
        self.timesteps = flow_timesteps(steps, shift)
        self.steps, self.shift, self.time_scale = int(steps), float(shift), float(time_scale)

    def _velocity(self, denoiser, x, t: float):
        v, _ = denoiser(x, self._time(x, t * self.time_scale), t)
        return v.to(x.dtype)

    def _steps(self, x, denoiser, noise_source, progress):
        ts = self.timesteps.tolist()
        for i in _progress(range(self.steps), self.steps, progress, self.name):
            x = x + (ts[i + 1] - ts[i]) * self._velocity(denoiser, x, ts[i])
        return x


class HeunSampler(EulerSampler):
    """Heun's second-order method (explicit trapezoid) on the same grid as :class:`EulerSampler`: an Euler
    predictor, then the average of the velocities at both ends. Two model calls per step, the last one at
    t = 0 included (the rectified-flow velocity is well defined there)."""

    name = "heun"

    def _steps(self, x, denoiser, noise_source, progress):
        ts = self.timesteps.tolist()
        for i in _progress(range(self.steps), self.steps, progress, self.name):
            dt = ts[i + 1] - ts[i]
            v = self._velocity(denoiser, x, ts[i])
            v_next = self._velocity(denoiser, x + dt * v, ts[i + 1])
            x = x + dt * 0.5 * (v + v_next)
        return x


class _DiscreteSampler(Sampler):
    """Shared by DDPM and DDIM: a descending subset of the DDPM's steps; the model sees the original step
    indices; guidance's normalised time is ``(step + 1) / T``."""

    def __init__(self, diffusion: Optional[DDPM] = None, steps: Optional[int] = None, clip_x0: Optional[float] = None):
        self.diffusion = diffusion if diffusion is not None else DDPM()
        if not isinstance(self.diffusion, DDPM):
            raise ValueError(f"diffusion must be a fastdit.diffusion.DDPM, got {type(self.diffusion).__name__}")
        self.timesteps = self.diffusion.spaced_timesteps(steps)
        self.steps = len(self.timesteps)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0}")
        self.clip_x0 = clip_x0

    def _pairs(self):
        """(t, alpha_bar_t, t_prev, alpha_bar_prev) per step; alpha_bar_prev = 1 after the last step."""
        ab = self.diffusion.alphas_cumprod.tolist()
        ts = self.timesteps.tolist()
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            yield t, ab[t], t_prev, (ab[t_prev] if t_prev >= 0 else 1.0)

    def _eps_x0(self, denoiser, x, t: int, a_t: float):
        T = self.diffusion.num_timesteps
        eps, extra = denoiser(x, self._time(x, float(t)), (t + 1) / T)
        eps = eps.to(x.dtype)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # keep eps consistent with the clipped x0
        return eps, x0, extra


class DDPMSampler(_DiscreteSampler):
    """Ancestral sampling of p(x_{t'} | x_t) (Ho et al. 2020), on all T steps or a respaced subset
    (improved DDPM's respacing: betas recomputed from alpha_bar at the kept steps).

    Args:
        diffusion: the :class:`DDPM` the model was trained with (default: cosine, T = 1000).
        steps: how many steps (None = all T).
        variance: ``"fixed_small"`` (the posterior variance beta-tilde), ``"fixed_large"`` (beta), or
            ``"learned_range"`` (DiT / improved DDPM: the model's extra C channels v interpolate the two in log
            space, ``log var = (v+1)/2 log beta + (1-(v+1)/2) log beta-tilde``; needs a 2C-channel model).
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (pixels: 1.0; latents: None).
    """

    name = "ddpm"
    stochastic = True

    def __init__(self, diffusion: Optional[DDPM] = None, steps: Optional[int] = None,
                 variance: str = "fixed_small", clip_x0: Optional[float] = None):
        super().__init__(diffusion, steps, clip_x0)
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        self.variance = variance

    def _steps(self, x, denoiser, noise_source, progress):
        for t, a_t, t_prev, a_prev in _progress(self._pairs(), self.steps, progress, self.name):
            eps, x0, extra = self._eps_x0(denoiser, x, t, a_t)
            beta = 1 - a_t / a_prev
            mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
            if t_prev < 0:
                x = mean  # the last step returns the posterior mean (= predicted x0) without noise
                continue
            small = beta * (1 - a_prev) / (1 - a_t)
            if self.variance == "fixed_small":
                std = math.sqrt(small)
            elif self.variance == "fixed_large":
                std = math.sqrt(beta)
            else:
                if extra is None:
                    raise ValueError("variance='learned_range' needs a model with learned sigma (2C output channels)")
                frac = (extra.to(x.dtype) + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small)))
            x = mean + std * noise_source.randn(x.shape[1:], x.device, x.dtype)
        return x


class DDIMSampler(_DiscreteSampler):
    """DDIM (Song et al. 2021) on a respaced subset of the DDPM's steps.

    ``x_{t'} = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')``: eta = 0 is deterministic (the same noise
    always gives the same sample), eta = 1 matches DDPM's posterior variance.

    Args:
        diffusion: the :class:`DDPM` the model was trained with (default: cosine, T = 1000).
        steps: how many steps (model calls).
        eta: stochasticity, >= 0.
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (None: no clamp).
    """

    name = "ddim"

    def __init__(self, diffusion: Optional[DDPM] = None, steps: int = 50, eta: float = 0.0,
                 clip_x0: Optional[float] = None):
        super().__init__(diffusion, steps, clip_x0)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def _steps(self, x, denoiser, noise_source, progress):
        for t, a_t, t_prev, a_prev in _progress(self._pairs(), self.steps, progress, self.name):
            eps, x0, _ = self._eps_x0(denoiser, x, t, a_t)
            sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * noise_source.randn(x.shape[1:], x.device, x.dtype)
        return x


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def sample(model: Callable[..., torch.Tensor], shape: Sequence[int], cond: Cond = None, uncond: Cond = None,
           cfg_scale: float = 1.0, sampler: str = "euler", steps: Optional[int] = 50, *,
           guidance_interval: Optional[Sequence[float]] = None, objective: Union[None, RectifiedFlow, DDPM] = None,
           shift: Optional[float] = None, time_scale: Optional[float] = None, eta: float = 0.0,
           variance: Optional[str] = None, clip_x0: Optional[float] = None,
           seed: Union[None, int, Sequence[int]] = None, generator: Optional[torch.Generator] = None,
           noise: Optional[torch.Tensor] = None, device=None, dtype: torch.dtype = torch.float32,
           progress: bool = True, compile: bool = False) -> torch.Tensor:
    """Draw samples (latents at t = 0) from a denoiser.

    Args:
        model: ``model(x, t, **cond)`` (velocity for euler/heun, eps for ddpm/ddim; 2C outputs are cut to C).
        shape: (B, C, H, W) of the latents to draw.
        cond / uncond: the model's keyword arguments for the conditional / unconditional calls (tensors of
            batch size B; uncond tensors may have batch size 1), e.g. ``{"y": labels}`` / ``{"y": null_labels}``.
        cfg_scale: classifier-free guidance scale on all channels (1 = off, uncond not needed then).
        sampler: ``"euler"`` | ``"heun"`` (rectified flow) | ``"ddpm"`` | ``"ddim"`` (epsilon models).
        steps: number of steps (ddpm: None = all T steps; heun makes 2 model calls per step).
        guidance_interval: ``(t_lo, t_hi)``: guide only at normalised times in that range (1 = noise).
        objective: the :class:`RectifiedFlow` / :class:`DDPM` the model was trained with; gives the time scale
            and shift (euler/heun) or the schedule (ddpm/ddim, default cosine T = 1000).
        shift, time_scale: rectified-flow overrides (default: from ``objective``, else 1.0 and 1000).
        eta: DDIM stochasticity; variance: DDPM variance (see :class:`DDPMSampler`; default: learned_range when
            the objective was trained with it, else fixed_small); clip_x0: clamp x0.
        seed: an int (reproducible per sample: sample i is the same in any batch size) or one int per sample.
        generator: instead of seed, a torch.Generator the per-sample seeds are drawn from (same state, same
            samples; the first k samples do not depend on B). With neither, torch's global CPU RNG is used.
        noise: explicit (B, C, H, W) initial noise (seed/generator still drive later stochastic draws).
        device: where to sample (default: the model's parameters' device, else CPU); dtype: state dtype.
        progress: tqdm progress bar.
        compile: run each step's model work through ``torch.compile`` graphs with static shapes
            (:mod:`fastdit.diffusion.compiled`): the guided step (cond + uncond in one 2B call and the guidance
            arithmetic) and the unguided step are one graph each, compiled once per shape signature (one stderr
            line says so) and reused by later runs of the same model; on CUDA they run as CUDA graphs. Results
            match eager sampling to float tolerance, not bitwise; two compiled runs match bitwise.

    Returns: (B, C, H, W) samples in ``dtype`` on ``device``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {shape}")
    device = _model_device(model) if device is None else torch.device(device)
    noise_source = PerSampleNoise.create(shape[0], seed=seed, generator=generator)
    if noise is None:
        x = noise_source.randn(shape[1:], device, dtype)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise.to(device=device, dtype=dtype)

    if sampler in ("euler", "heun"):
        if objective is not None and not isinstance(objective, RectifiedFlow):
            raise ValueError(f"sampler {sampler!r} integrates a rectified flow; "
                             f"objective is {type(objective).__name__}")
        if shift is None:
            shift = objective.shift_for(shape[2:]) if objective is not None else 1.0
        if time_scale is None:
            time_scale = objective.time_scale if objective is not None else 1000.0
        cls = EulerSampler if sampler == "euler" else HeunSampler
        runner = cls(steps=steps, shift=shift, time_scale=time_scale)
    else:
        if objective is not None and not isinstance(objective, DDPM):
            raise ValueError(f"sampler {sampler!r} needs a DDPM objective; got {type(objective).__name__}")
        if shift is not None or time_scale is not None:
            raise ValueError(f"shift and time_scale apply to rectified-flow samplers, not {sampler!r}")
        if sampler == "ddpm":
            if variance is None:  # a model trained with learned variance samples with it
                learned = getattr(objective, "variance", None) == "learned_range"
                variance = "learned_range" if learned else "fixed_small"
            runner = DDPMSampler(objective, steps=steps, variance=variance, clip_x0=clip_x0)
        else:
            runner = DDIMSampler(objective, steps=50 if steps is None else steps, eta=eta, clip_x0=clip_x0)
    return runner(model, x, cond=cond, uncond=uncond, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                  noise_source=noise_source, progress=progress, compile=compile)

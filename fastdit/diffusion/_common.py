"""Helpers shared by the objectives and the samplers: model-output checks, conditioning batches, RNG plumbing."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

Cond = Optional[Dict[str, Any]]


def split_prediction(out: torch.Tensor, x: torch.Tensor) -> tuple:
    """Split a denoiser's output into (prediction, extra).

    out: (B, C, H, W) or (B, 2C, H, W) for a model with learned sigma (DiT); x: the (B, C, H, W) input.
    Returns the first C channels (the prediction: velocity or epsilon) and the remaining C channels
    (the variance interpolation values) or None. Any other shape is a ValueError: silently slicing a
    wrong output would train or sample garbage.
    """
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a Tensor, got {type(out).__name__}")
    C = x.shape[1]
    if out.dim() != x.dim() or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match the input {tuple(x.shape)} "
                         f"(expected (B, C, ...) or (B, 2C, ...) with the same batch and spatial sizes)")
    if out.shape[1] == C:
        return out, None
    if out.shape[1] == 2 * C:
        return out[:, :C], out[:, C:]
    raise ValueError(f"model output has {out.shape[1]} channels; expected {C} (the prediction) or {2 * C} "
                     f"(prediction + learned sigma) for a {C}-channel input")


def check_latents(z: torch.Tensor, name: str = "z0") -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point Tensor, got "
                         f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
    if z.dim() < 2 or z.shape[0] == 0:
        raise ValueError(f"{name} must be (B, C, ...) with B >= 1, got shape {tuple(z.shape)}")


def check_cond(cond: Cond, batch: int, name: str = "cond") -> Dict[str, Any]:
    """Validates a conditioning dict: every tensor value has batch size ``batch`` in dim 0."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise ValueError(f"{name} must be a dict of keyword arguments for the model (e.g. {{'y': labels}}), "
                         f"got {type(cond).__name__}")
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != batch):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}; its first dim must be the batch "
                             f"size {batch}")
    return cond


def rand_on(generator: Optional[torch.Generator], shape, device, kind: str = "randn",
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random numbers from ``generator`` (on the generator's device) or from the global RNG of ``device``,
    returned on ``device``. Drawing on the generator's own device keeps a CPU generator usable for CUDA
    tensors, and gives the same numbers wherever the result lands."""
    fn = {"randn": torch.randn, "rand": torch.rand}[kind]
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def reduce_loss(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, ...) squared errors -> per-sample means (B,) or their mean (a scalar)."""
    per_sample = per_element.flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

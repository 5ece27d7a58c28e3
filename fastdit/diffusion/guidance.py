"""Classifier-free guidance (Ho & Salimans 2022) over every latent channel, with an optional guidance interval.

    guided = uncond + scale * (cond - uncond)

is applied to the whole prediction (all C channels of a (B, C, H, W) velocity or epsilon). Several DiT codebases
guide only the first three channels and copy the rest from the conditional half, which silently breaks
guidance for 4-channel (and wider) latents; here no channel is left out.

Guidance can be restricted to an interval of normalised time (Kynkaanniemi et al. 2024, "Applying guidance in
a limited interval"): outside ``[t_lo, t_hi]`` only the conditional model runs. Normalised time is 1 at pure
noise and 0 at data: rectified flow's t itself; ``(step + 1) / T`` for DDPM/DDIM steps.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from fastdit.diffusion._common import Cond, check_cond, split_prediction


def _batch_uncond(cond: Dict[str, Any], uncond: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """Checks that uncond has cond's keys and shapes; a tensor with batch size 1 is expanded to ``batch``."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, torch.Tensor) != isinstance(u, torch.Tensor):
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or both not")
        if not isinstance(c, torch.Tensor):
            if c is not u and c != u:
                raise ValueError(f"non-tensor cond[{key!r}] = {c!r} differs from uncond[{key!r}] = {u!r}; "
                                 f"only tensors can differ between the two halves of a batched CFG call")
            out[key] = c
            continue
        if u.dim() == c.dim() and u.shape[0] == 1 and batch > 1:
            u = u.expand(batch, *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(f"uncond[{key!r}] has shape {tuple(u.shape)}, cond[{key!r}] {tuple(c.shape)}: they must "
                             f"match (uncond may have batch size 1), e.g. pad captions to the same length")
        if u.dtype != c.dtype:
            raise ValueError(f"uncond[{key!r}] is {u.dtype} but cond[{key!r}] is {c.dtype}")
        out[key] = u.to(c.device)
    return out


class GuidedDenoiser:
    """Wraps a denoiser for sampling: one forward per step, classifier-free guided when required.

    Args:
        model: ``model(x, t, **cond)`` -> (B, C, ...) or (B, 2C, ...) (learned sigma).
        cond: keyword arguments of the conditional call (tensors with batch size B).
        uncond: those of the unconditional call (same keys and shapes, or batch size 1), e.g. the null class
            ``{"y": full((B,), num_classes)}`` for DiT or an empty caption's embedding for MMDiT.
        scale: guidance scale; 1 means no guidance and the unconditional model is never called.
        interval: ``(t_lo, t_hi)`` in normalised time; guidance only where ``t_lo <= t <= t_hi``.

    Call ``denoiser(x, t_model, t_norm)`` with x (B, C, ...), t_model (B,) in model units and t_norm a float in
    [0, 1]. It returns ``(prediction (B, C, ...), extra)``: the guided prediction, and the learned-sigma
    channels of the conditional half (B, C, ...) or None. When guidance is active, cond and uncond run as one
    batched call of size 2B (x, t and every conditioning tensor concatenated).
    """

    def __init__(self, model: Callable[..., torch.Tensor], cond: Cond = None, uncond: Cond = None,
                 scale: float = 1.0, interval: Optional[Sequence[float]] = None):
        self.model = model
        self.scale = float(scale)
        self.cond = cond if cond is not None else {}
        if not isinstance(self.cond, dict):
            raise ValueError(f"cond must be a dict of keyword arguments for the model, got {type(cond).__name__}")
        if uncond is not None and not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of keyword arguments for the model, got {type(uncond).__name__}")
        if self.scale != 1.0 and uncond is None:
            raise ValueError(f"cfg_scale={self.scale} needs uncond (the unconditional model inputs, e.g. the null "
                             f"class label); pass uncond or use cfg_scale=1")
        self.uncond = uncond
        if interval is not None:
            if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
                raise ValueError(f"guidance interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {interval}")
            interval = (float(interval[0]), float(interval[1]))
        self.interval = interval
        self.calls = 0  # model calls made, for callers that count function evaluations
        self._batched: Optional[Tuple[int, Dict[str, Any]]] = None

    def guides_at(self, t_norm: float) -> bool:
        """Whether guidance (and so the unconditional call) is applied at normalised time ``t_norm``."""
        if self.scale == 1.0 or self.uncond is None:
            return False
        if self.interval is None:
            return True
        return self.interval[0] <= t_norm <= self.interval[1]

    def _cond_pair(self, batch: int) -> Dict[str, Any]:
        if self._batched is None or self._batched[0] != batch:
            cond = check_cond(self.cond, batch)
            uncond = _batch_uncond(cond, self.uncond, batch)
            both = {k: torch.cat([v, uncond[k]]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
            self._batched = (batch, both)
        return self._batched[1]

    def __call__(self, x: torch.Tensor, t_model: torch.Tensor, t_norm: float):
        B = x.shape[0]
        self.calls += 1
        if not self.guides_at(t_norm):
            return split_prediction(self.model(x, t_model, **check_cond(self.cond, B)), x)
        out = self.model(torch.cat([x, x]), torch.cat([t_model, t_model]), **self._cond_pair(B))
        pred, extra = split_prediction(out, torch.cat([x, x]))
        cond_pred, uncond_pred = pred[:B], pred[B:]
        guided = uncond_pred + self.scale * (cond_pred - uncond_pred)
        return guided, (extra[:B] if extra is not None else None)

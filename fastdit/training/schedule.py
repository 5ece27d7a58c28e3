"""Learning-rate schedules: linear warm-up, then constant or cosine decay, stepped per optimizer step."""
from __future__ import annotations

import math
from typing import Optional

import torch


def lr_factor(step: int, *, kind: str = "constant", warmup_steps: int = 0, total_steps: Optional[int] = None,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (1-based: the first update is step 1).

    Warm-up: ``step / warmup_steps`` for ``step <= warmup_steps`` (the first update is not wasted at
    LR 0). After it, ``constant`` stays at 1; ``cosine`` follows
    ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total - warmup)`` clamped to
    [0, 1] and ``r = min_lr_ratio``, reaching ``r`` at ``total_steps`` and staying there.
    """
    if step < 1:
        raise ValueError(f"optimizer steps are numbered from 1, got {step}")
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule kind {kind!r} (constant, cosine)")
    if kind == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError("a cosine schedule needs total_steps > warmup_steps")
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str = "constant", warmup_steps: int = 0,
                    total_steps: Optional[int] = None,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose LR during optimizer step ``k`` (1-based) is ``base_lr * lr_factor(k)``.

    Call ``scheduler.step()`` once after each training step (skipped steps included, so the LR follows
    the step counter). Its state dict holds only numbers (the factor is a closure, which ``LambdaLR``
    leaves out), so it loads with ``weights_only=True``; the shape of the schedule comes from the config.
    """
    lr_factor(1, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    def factor(completed: int) -> float:  # LambdaLR passes the number of completed steps
        return lr_factor(completed + 1, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

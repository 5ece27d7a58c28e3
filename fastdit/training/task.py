"""The training-objective protocol the trainer drives (diffusion objectives implement it)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainTask(Protocol):
    """What the trainer needs from an objective.

    Required:
        ``loss(model, batch) -> Tensor``: the scalar loss of one step on this rank's ``batch`` (a dict of
        tensors already on the device). ``model`` is the *wrapped* training model (DDP/FSDP/compiled):
        call it (``model(...)``) rather than reaching into submodules, or DDP cannot synchronise
        gradients. It runs under the configured autocast. It may draw from the global torch/numpy/python
        RNGs (noise, timesteps): the trainer seeds them per rank and checkpoints their states.

    Optional attributes (looked up with ``getattr``):
        ``flops_per_sample``: true FLOPs of forward + backward for one sample (int, or a no-argument
            callable returning one); enables TFLOP/s and MFU in the logs.
        ``tokens_per_sample``: tokens one sample puts through the transformer; enables tokens/s.
        ``samples(model, step) -> Tensor``: images ``(B, C, H, W)`` in [-1, 1] for a grid PNG at the
            sampling interval. Called on every rank (sharded models need all ranks) with the unwrapped
            model in eval mode, EMA weights swapped in when EMA is on, under ``torch.no_grad`` and a
            forked RNG seeded with ``run.seed`` (the same noise every time, and training RNG untouched).
    """

    def loss(self, model: nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
        ...


def task_flops_per_sample(task: Any) -> Optional[float]:
    value = getattr(task, "flops_per_sample", None)
    if callable(value):
        value = value()
    return float(value) if value else None


def task_tokens_per_sample(task: Any) -> Optional[int]:
    value = getattr(task, "tokens_per_sample", None)
    if callable(value):
        value = value()
    return int(value) if value else None

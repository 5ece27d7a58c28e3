"""Training tasks for :class:`fastdit.training.Trainer`: latent diffusion and autoencoder reconstruction.

A task turns a batch (a dict of tensors) into a scalar loss through the *wrapped* model (DDP/compiled),
and optionally tells the trainer its FLOPs per sample and how to draw a sample grid. The trainer's
protocol is duck-typed (``fastdit.training.TrainTask``), so nothing here imports the trainer.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastdit.diffusion.ddpm import DDPM
from fastdit.diffusion.rectified_flow import RectifiedFlow

SampleFn = Callable[[nn.Module, int], torch.Tensor]


class DiffusionTask:
    """Diffusion loss of a batch ``{"x": latents (B, C, H, W), <condition keys>...}``.

    Args:
        objective: :class:`RectifiedFlow` or :class:`DDPM` (draws t and noise from the global RNG, which
            the trainer seeds per rank and checkpoints, so resume is exact).
        cond_keys: batch keys passed to the model as keyword arguments (``("y",)`` for a class-conditional
            DiT — its label embedder drops labels to the null class in training — ``("context",
            "context_mask")`` for an MMDiT).
        caption_dropout: probability of dropping a sample's caption for classifier-free guidance: its
            ``context_mask`` row becomes all False (zero real tokens, the unconditional input) and its
            ``context`` row zero. Needs ``context_mask`` in the batch.
        flops_per_sample / tokens_per_sample: forwarded to the trainer's throughput and MFU figures.
        samples: ``fn(model, step) -> images (B, C, H, W) in [-1, 1]`` for the trainer's sample grids.
    """

    def __init__(self, objective: Union[RectifiedFlow, DDPM], cond_keys: Sequence[str] = ("y",), *,
                 caption_dropout: float = 0.0, flops_per_sample: Optional[float] = None,
                 tokens_per_sample: Optional[int] = None, samples: Optional[SampleFn] = None):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.objective = objective
        self.cond_keys = tuple(cond_keys)
        self.caption_dropout = float(caption_dropout)
        if flops_per_sample:
            self.flops_per_sample = flops_per_sample
        if tokens_per_sample:
            self.tokens_per_sample = tokens_per_sample
        if samples is not None:
            self.samples = samples

    def condition(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        missing = [k for k in self.cond_keys if k not in batch]
        if missing:
            raise KeyError(f"DiffusionTask: batch has no {missing} (keys: {sorted(batch)})")
        cond = {k: batch[k] for k in self.cond_keys}
        if self.caption_dropout > 0:
            if "context_mask" not in cond or "context" not in cond:
                raise KeyError("DiffusionTask: caption_dropout needs 'context' and 'context_mask' in cond_keys")
            mask = cond["context_mask"]
            if mask.dtype != torch.bool:
                raise TypeError("DiffusionTask: caption_dropout needs a bool context_mask (B, L)")
            keep = torch.rand(mask.shape[0], device=mask.device) >= self.caption_dropout
            cond["context_mask"] = mask & keep[:, None]
            cond["context"] = cond["context"] * keep[:, None, None].to(cond["context"].dtype)
        return cond

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        if "x" not in batch:
            raise KeyError(f"DiffusionTask: batch has no 'x' latents (keys: {sorted(batch)})")
        return self.objective.loss(model, batch["x"], self.condition(batch))


class ReconstructionTask:
    """Autoencoder training: MSE between ``model(batch["x"])`` and ``batch["x"]`` (the model returns the
    reconstruction, as :class:`fastdit.latents.ConvAutoencoder` does)."""

    def __init__(self, samples: Optional[SampleFn] = None):
        if samples is not None:
            self.samples = samples

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["x"]
        return F.mse_loss(model(images).float(), images.float())

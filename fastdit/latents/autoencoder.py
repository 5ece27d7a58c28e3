"""A small plain convolutional autoencoder (no KL term) for small images, e.g. 1x16x16 or 1x32x32 digits.

Each of ``len(channels)`` levels halves the resolution (16x16 -> 4x4 with two levels). The raw latents of a
plain AE have arbitrary per-channel offsets and scales, which a diffusion model's unit-variance noise does not
match, so the AE keeps per-channel statistics of its latents over the training set (``fit_latent_stats``) as
buffers (they travel with the state dict) and ``encode`` returns ``(raw - mean) / std``; ``decode`` undoes it.

Training: ``loss(images)`` is the reconstruction MSE, so a generic trainer can optimise it like any model;
call ``fit_latent_stats(train_images)`` once training is done, before encoding a data set for diffusion, and
save the autoencoder (e.g. ``fastdit.training.build.save_autoencoder``) only after that: the statistics are
part of the state dict, so a copy saved before (such as a trainer's checkpoint of the training run) decodes
with zero means and unit stds (``stats_fitted`` False), not the latent space the diffusion model learned.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastdit.latents.base import LatentSpace


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.SiLU(),
    )


class ConvAutoencoder(LatentSpace):
    """Conv encoder/decoder with per-channel latent normalisation.

    Args:
        image_channels: channels of the images (1 for digits).
        latent_channels: channels of the latents.
        channels: width of each level; the downsample factor is ``2 ** len(channels)``.

    Buffers (in the state dict): ``latent_mean`` (latent_channels,), ``latent_std`` (latent_channels,),
    ``latent_stats_fitted`` (a bool scalar). ``config`` is a JSON-able dict that rebuilds the module:
    ``ConvAutoencoder(**ae.config)``.
    """

    def __init__(self, image_channels: int = 1, latent_channels: int = 4, channels: Sequence[int] = (32, 64)):
        super().__init__()
        channels = [int(c) for c in channels]
        if image_channels < 1 or latent_channels < 1 or not channels or min(channels) < 1:
            raise ValueError(f"image_channels, latent_channels and every width in channels must be >= 1 and channels "
                             f"non-empty; got {image_channels}, {latent_channels}, {channels}")
        self.config = {"image_channels": int(image_channels), "latent_channels": int(latent_channels),
                       "channels": channels}
        self.image_channels, self.latent_channels = int(image_channels), int(latent_channels)
        self.downsample_factor = 2 ** len(channels)

        layers = [nn.Conv2d(image_channels, channels[0], 3, padding=1), nn.SiLU()]
        c_prev = channels[0]
        for c in channels:
            layers.append(_conv_block(c_prev, c, stride=2))
            c_prev = c
        layers.append(nn.Conv2d(c_prev, latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*layers)

        layers = [nn.Conv2d(latent_channels, channels[-1], 3, padding=1), nn.SiLU()]
        c_prev = channels[-1]
        for c in reversed(channels):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(c_prev, c)]
            c_prev = c
        layers.append(nn.Conv2d(c_prev, image_channels, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        self.register_buffer("latent_stats_fitted", torch.tensor(False))

    # -- raw maps (what is trained) -----------------------------------------------------------------------
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, latent_channels, H/f, W/f) un-normalised latents (with autograd)."""
        self._check_images(images)
        return self.encoder(images)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents -> images (with autograd)."""
        self._check_latents(raw)
        return self.decoder(raw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``images``, (B, C, H, W)."""
        return self.decode_raw(self.encode_raw(images))

    def loss(self, batch: Union[torch.Tensor, Sequence], reduction: str = "mean") -> torch.Tensor:
        """Reconstruction MSE of a batch of images (B, C, H, W); a (images, labels, ...) tuple or list is
        accepted too (its first element is used), as data loaders often yield one.
        ``reduction``: ``"mean"`` -> scalar, ``"none"`` -> (B,) per image."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        err = F.mse_loss(self(images).float(), images.float(), reduction="none").flatten(1).mean(1)
        if reduction == "none":
            return err
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return err.mean()

    # -- normalisation ------------------------------------------------------------------------------------
    @property
    def stats_fitted(self) -> bool:
        return bool(self.latent_stats_fitted)

    @torch.no_grad()
    def fit_latent_stats(self, data: Union[torch.Tensor, Iterable], batch_size: int = 256,
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
        """Set ``latent_mean`` / ``latent_std`` to the per-channel mean and standard deviation of the raw latents
        of ``data`` (over images and positions), and mark the stats fitted.

        data: a (N, C, H, W) tensor of training images (processed in chunks of ``batch_size``), or an iterable
        of batches (tensors, or tuples / lists whose first element is the images). Sums are accumulated in
        float64 on the model's device; the encoder runs in eval mode. Returns (mean, std).
        """
        if isinstance(data, torch.Tensor):
            if data.dim() != 4 or data.shape[0] == 0:
                raise ValueError(f"data must be a non-empty (N, C, H, W) tensor, got shape {tuple(data.shape)}")
            batches = data.split(batch_size)
        else:
            batches = data
        device = self.latent_mean.device
        total = torch.zeros(self.latent_channels, dtype=torch.float64, device=device)
        total_sq = torch.zeros_like(total)
        count = 0
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                raw = self.encode_raw(images.to(device=device, dtype=self.latent_mean.dtype)).double()
                total += raw.sum(dim=(0, 2, 3))
                total_sq += (raw * raw).sum(dim=(0, 2, 3))
                count += raw.shape[0] * raw.shape[2] * raw.shape[3]
        finally:
            self.train(was_training)
        if count == 0:
            raise ValueError("fit_latent_stats got no images")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(var.sqrt().clamp_min(eps))
        self.latent_stats_fitted.fill_(True)
        return self.latent_mean.clone(), self.latent_std.clone()

    def _stats(self, like: torch.Tensor):
        shape = (1, self.latent_channels, 1, 1)
        return self.latent_mean.to(like.dtype).view(shape), self.latent_std.to(like.dtype).view(shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> normalised (B, latent_channels, H/f, W/f) latents: ``(raw - mean) / std``."""
        if not self.stats_fitted:
            warnings.warn("ConvAutoencoder.encode before fit_latent_stats: latents are not normalised",
                          stacklevel=2)
        raw = self.encode_raw(images)
        mean, std = self._stats(raw)
        return (raw - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, C, H, W) images: ``decoder(latents * std + mean)``."""
        self._check_latents(latents)
        mean, std = self._stats(latents)
        return self.decode_raw(latents * std + mean)

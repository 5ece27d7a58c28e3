"""The interface every latent space of fastdit keeps, so that trainers and samplers need not know which one."""
from __future__ import annotations

import abc
from typing import Sequence, Tuple

import torch
from torch import nn


class LatentSpace(nn.Module, abc.ABC):
    """An image <-> latent map.

    - ``encode(images)``: (B, image_channels, H, W) images in [-1, 1] -> (B, latent_channels, H/f, W/f) float32
      latents, already normalised for diffusion (roughly zero mean, unit variance per channel);
    - ``decode(latents)``: the inverse map back to images (B, image_channels, H, W);
    - ``latent_channels``, ``image_channels`` and ``downsample_factor`` (f) describe the shapes.

    Neither method clamps: clamp decoded images to [-1, 1] for display.
    """

    latent_channels: int
    image_channels: int
    downsample_factor: int

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, image_channels, H, W) -> (B, latent_channels, H/f, W/f) normalised latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) normalised latents -> (B, image_channels, h*f, w*f) images."""

    def latent_shape(self, image_shape: Sequence[int]) -> Tuple[int, ...]:
        """The latent shape for an image shape (B, C, H, W) or (C, H, W); H and W must be divisible by f."""
        *lead, c, h, w = (int(s) for s in image_shape)
        f = self.downsample_factor
        if c != self.image_channels or h % f or w % f:
            raise ValueError(f"image shape {tuple(image_shape)} does not fit this latent space: expected "
                             f"{self.image_channels} channels and H, W divisible by {f}")
        return (*lead, self.latent_channels, h // f, w // f)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        self.latent_shape(images.shape)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")

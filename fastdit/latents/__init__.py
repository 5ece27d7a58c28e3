"""Latent spaces: images <-> normalised latents for diffusion.

- :class:`AutoencoderKLLatents`: a diffusers ``AutoencoderKL`` (posterior mean, shift and scaling factor);
  diffusers is imported only when one is loaded.
- :class:`ConvAutoencoder`: a small plain conv autoencoder for small images, with per-channel latent
  normalisation stored in its state dict and a reconstruction ``loss`` for training.

Both follow :class:`LatentSpace`: ``encode(images) -> latents``, ``decode(latents) -> images``,
``latent_channels``, ``image_channels``, ``downsample_factor``.
"""
from fastdit.latents.autoencoder import ConvAutoencoder
from fastdit.latents.base import LatentSpace
from fastdit.latents.vae import AutoencoderKLLatents

__all__ = ["LatentSpace", "AutoencoderKLLatents", "ConvAutoencoder"]

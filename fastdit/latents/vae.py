"""A diffusers ``AutoencoderKL`` as a fastdit latent space (SD / SDXL / SD3 / Flux VAEs).

    latents = (posterior_mean - shift_factor) * scaling_factor          encode
    images  = vae.decode(latents / scaling_factor + shift_factor)       decode (the exact inverse)

The shift is applied only when the VAE's config has a non-None ``shift_factor`` (SD3 and Flux VAEs have one,
SD 1.x/2.x/XL do not). diffusers is imported only when a VAE is loaded, so ``fastdit.latents`` imports
without it.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdit.latents.base import LatentSpace


class AutoencoderKLLatents(LatentSpace):
    """Wraps a diffusers ``AutoencoderKL`` (frozen and in eval mode by default).

    Args:
        vae: a diffusers ``AutoencoderKL`` (or anything with its ``encode(x).latent_dist``, ``decode(z).sample``
            and ``config``).
        scaling_factor, shift_factor: override the config's values (None: take them from ``vae.config``;
            a config without ``shift_factor`` or with None means no shift).
        freeze: ``requires_grad_(False)`` and ``eval()`` the VAE (it is a fixed map for diffusion training).

    encode/decode run without autograd, in the VAE's dtype; latents come back as float32, images as float32.
    """

    def __init__(self, vae, scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                 freeze: bool = True):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(config, "shift_factor", None)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        self.latent_channels = int(config.latent_channels)
        self.image_channels = int(config.in_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        if freeze:
            vae.requires_grad_(False)
            vae.eval()

    @classmethod
    def from_pretrained(cls, path_or_id: str, subfolder: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                        device=None, allow_download: bool = False, **kwargs) -> "AutoencoderKLLatents":
        """Load with ``diffusers.AutoencoderKL.from_pretrained(path_or_id, subfolder=..., **kwargs)``, then move
        to device/dtype and wrap. ``subfolder="vae"`` reads the VAE of a full pipeline repository.

        Nothing is fetched from a hub unless ``allow_download=True``: by default ``path_or_id`` must be a local
        directory or already in the local Hugging Face cache (``local_files_only=True``); a missing model is a
        ``FileNotFoundError`` that says so."""
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("AutoencoderKLLatents needs diffusers: pip install diffusers") from err
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        if not allow_download:
            kwargs["local_files_only"] = True
        try:
            vae = AutoencoderKL.from_pretrained(path_or_id, **kwargs)
        except OSError as err:  # diffusers raises EnvironmentError (= OSError) for a model it cannot find
            if allow_download:
                raise
            where = f"{path_or_id}" + (f" (subfolder {subfolder})" if subfolder else "")
            raise FileNotFoundError(f"no local AutoencoderKL at {where}: fastdit loads models from local "
                                    f"directories or the local cache only, unless downloads are allowed "
                                    f"explicitly (allow_download=True; in a run config "
                                    f"data.options.vae_allow_download=true). {str(err).splitlines()[0]}") from None
        vae.to(device=device, dtype=dtype)
        return cls(vae)

    @property
    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def _to_latents(self, raw: torch.Tensor) -> torch.Tensor:
        if self.shift_factor is not None:
            raw = raw - self.shift_factor
        return raw * self.scaling_factor

    def _from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents / self.scaling_factor
        if self.shift_factor is not None:
            raw = raw + self.shift_factor
        return raw

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, latent_channels, H/f, W/f) float32 latents.

        Uses the posterior mean; ``sample=True`` draws from the posterior instead (with ``generator``)."""
        self._check_images(images)
        p = self._param
        posterior = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
        raw = posterior.sample(generator=generator) if sample else posterior.mean
        return self._to_latents(raw.float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) latents -> (B, C, h*f, w*f) float32 images (about [-1, 1], unclamped)."""
        self._check_latents(latents)
        p = self._param
        raw = self._from_latents(latents.float()).to(device=p.device, dtype=p.dtype)
        return self.vae.decode(raw).sample.float()

"""fastdit inside diffusers models.

- :func:`apply_fastdit` patches a diffusers transformer (Flux, SD3/SD3.5, DiT) in place onto fastdit's fused
  ops, keeping its parameters and keys; :func:`unpatch_fastdit` / :func:`fastdit_patched` undo it (:mod:`.patch`).
- Converters to and from fastdit's own models: SD3 and Flux <-> :class:`~fastdit.models.MMDiT`
  (:mod:`.convert_mmdit`), diffusers' DiT <-> :class:`~fastdit.models.DiT` (:mod:`.convert_dit`).
"""
from fastdit.integrations.diffusers.convert_dit import (diffusers_config_from_dit, diffusers_from_dit,
                                                        dit_config_from_diffusers, dit_from_diffusers)
from fastdit.integrations.diffusers.convert_mmdit import (flux_config_from_mmdit, flux_from_mmdit, flux_image_ids,
                                                          flux_pack, flux_text_ids, flux_unpack,
                                                          mmdit_config_from_flux, mmdit_config_from_sd3,
                                                          mmdit_from_flux, mmdit_from_sd3, sd3_config_from_mmdit,
                                                          sd3_from_mmdit)
from fastdit.integrations.diffusers.patch import (PatchReport, apply_fastdit, fastdit_patched, is_patched,
                                                  unpatch_fastdit)

__all__ = ["apply_fastdit", "unpatch_fastdit", "fastdit_patched", "is_patched", "PatchReport",
           "mmdit_from_sd3", "sd3_from_mmdit", "mmdit_from_flux", "flux_from_mmdit", "mmdit_config_from_sd3",
           "mmdit_config_from_flux", "sd3_config_from_mmdit", "flux_config_from_mmdit", "flux_pack", "flux_unpack",
           "flux_image_ids", "flux_text_ids", "dit_from_diffusers", "diffusers_from_dit",
           "dit_config_from_diffusers", "diffusers_config_from_dit"]

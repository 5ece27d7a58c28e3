"""fastdit inside diffusers models: :func:`apply_fastdit` patches a diffusers transformer (Flux, SD3/SD3.5,
DiT) in place onto fastdit's fused ops (see :mod:`.patch`)."""
from fastdit.integrations.diffusers.patch import (PatchReport, apply_fastdit, fastdit_patched, is_patched,
                                                  unpatch_fastdit)

__all__ = ["apply_fastdit", "unpatch_fastdit", "fastdit_patched", "is_patched", "PatchReport"]

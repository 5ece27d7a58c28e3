"""fastdit: fused Triton kernels, drop-in modules and training for Diffusion Transformers."""
from fastdit.backend import BACKENDS, get_backend, set_backend, use_backend
from fastdit import ops  # registers the torch.ops.fastdit.* library ops (imports no Triton)

__version__ = "0.3.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "ops", "__version__"]

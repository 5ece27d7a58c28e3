"""fastdit: fused Triton kernels, drop-in modules and training for Diffusion Transformers."""
from fastdit.backend import BACKENDS, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "__version__"]

"""Drop-in modules for DiT-family models. Each takes ``backend=None`` (follow the global default,
see :mod:`fastdit.backend`) or ``"auto" | "triton" | "reference"``; :func:`set_module_backend` changes
it for every fastdit module inside a model."""
from typing import Optional

from torch import nn

from fastdit.backend import resolve_backend
from fastdit.modules.attention import JointAttention
from fastdit.modules.blocks import DiTBlock, JointDiTBlock, Mlp, SingleStreamDiTBlock
from fastdit.modules.norms import AdaLNModulation, ModulatedLayerNorm, RMSNorm
from fastdit.modules.rotary import RotaryEmbedding


def set_module_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set ``backend`` on every fastdit module in ``model`` (None = follow the global default)."""
    if backend is not None:
        resolve_backend(backend)  # validate
    for module in model.modules():
        if isinstance(module, (ModulatedLayerNorm, RMSNorm, RotaryEmbedding, JointAttention, Mlp,
                               SingleStreamDiTBlock)):
            module.backend = backend
    return model


__all__ = ["AdaLNModulation", "ModulatedLayerNorm", "RMSNorm", "RotaryEmbedding", "JointAttention",
           "Mlp", "DiTBlock", "JointDiTBlock", "SingleStreamDiTBlock", "set_module_backend"]

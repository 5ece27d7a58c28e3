"""Normalisation modules: AdaLN-Zero modulation, modulated LayerNorm, RMSNorm (QK-norm)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastdit.ops.adaln import adaln_modulate
from fastdit.ops.adaln_fp8 import adaln_modulate_fp8, gated_residual_adaln_fp8
from fastdit.ops.gated_adaln import gated_residual_adaln
from fastdit.ops.rmsnorm import rms_norm


class AdaLNModulation(nn.Sequential):
    """AdaLN-Zero conditioning: ``SiLU -> Linear(cond_dim, n_chunks * dim)``, zero-initialised, so each
    block starts as the identity (its gates are 0).

    ``forward(c)`` with c: (B, cond_dim) (or (B, N, cond_dim) for per-token conditioning) returns a
    tuple of ``n_chunks`` tensors of shape (B, dim) (or (B, N, dim)) — for a DiT block: shift, scale,
    gate of the attention, then of the MLP. It is an ``nn.Sequential`` so its state-dict keys are those
    of DiT's ``adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(...))``: ``1.weight``, ``1.bias``.
    """

    def __init__(self, dim: int, n_chunks: int, cond_dim: Optional[int] = None, bias: bool = True):
        super().__init__(nn.SiLU(), nn.Linear(cond_dim or dim, n_chunks * dim, bias=bias))
        self.dim, self.n_chunks = dim, n_chunks
        nn.init.zeros_(self[1].weight)
        if bias:
            nn.init.zeros_(self[1].bias)

    def forward(self, c: Tensor) -> Tuple[Tensor, ...]:
        return super().forward(c).chunk(self.n_chunks, dim=-1)


class ModulatedLayerNorm(nn.Module):
    """LayerNorm without affine parameters followed by AdaLN modulation; replaces DiT's
    ``nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)`` + ``modulate`` (no state either).

    ``forward(x, shift, scale)`` = ``LN(x) * (1 + scale) + shift``; ``gated(x, y, gate, shift, scale)``
    also applies the preceding gated residual and returns ``(x + gate*y, LN(x + gate*y)*(1+scale)+shift)``.
    x: (B, N, dim); shift/scale/gate: (B, dim) or (B, N, dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend

    def _check_dim(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ModulatedLayerNorm({self.dim}): x has last dimension {x.shape[-1]}")

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        self._check_dim(x)
        return adaln_modulate(x, shift, scale, self.eps, backend=self.backend)

    def gated(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
        self._check_dim(x)
        return gated_residual_adaln(x, y, gate, shift, scale, self.eps, backend=self.backend)

    def fp8(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``forward`` plus the output quantised to e4m3 per row for an FP8 GEMM: ``(out, out_q, q_scale)``
        (:func:`fastdit.ops.adaln_fp8.adaln_modulate_fp8`)."""
        self._check_dim(x)
        return adaln_modulate_fp8(x, shift, scale, self.eps, backend=self.backend)

    def gated_fp8(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``gated`` plus the output quantised to e4m3 per row: ``(x', out, out_q, q_scale)``."""
        self._check_dim(x)
        return gated_residual_adaln_fp8(x, y, gate, shift, scale, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"


class RMSNorm(nn.Module):
    """RMSNorm of the last dimension with a learned scale (key ``weight``, as ``torch.nn.RMSNorm``);
    used per head as QK-norm. x: (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, backend={self.backend!r}"

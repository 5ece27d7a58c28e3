"""RotaryEmbedding: builds RoPE tables for sequences, image grids and multi-axis ids, and applies them."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastdit.ops.rotary import rope, rope_freqs, rope_freqs_1d, rope_freqs_2d


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for heads of size ``head_dim`` (no parameters, no state).

    Tables (float32, (N, head_dim/2, 2), see :mod:`fastdit.ops.rotary`) are built once per forward of a
    model and passed to every attention layer:

    - :meth:`table_1d` (n tokens of a sequence), :meth:`table_2d` (an h × w grid, axial),
    - :meth:`table` (Flux-style ids (N, A) or (B, N, A) with ``axes_dims``).

    ``forward(x, freqs)`` rotates x: (B, N, H, head_dim); ``interleaved`` picks the channel pairing.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, axes_dims: Optional[Sequence[int]] = None,
                 interleaved: bool = True, backend: Optional[str] = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        if axes_dims is not None and sum(axes_dims) != head_dim:
            raise ValueError(f"RotaryEmbedding: axes_dims {list(axes_dims)} must sum to head_dim {head_dim}")
        self.head_dim, self.theta, self.interleaved, self.backend = head_dim, theta, interleaved, backend
        self.axes_dims = None if axes_dims is None else [int(a) for a in axes_dims]

    def table_1d(self, n: int, offset: int = 0, device: Optional[torch.device] = None) -> Tensor:
        return rope_freqs_1d(n, self.head_dim, self.theta, offset, device)

    def table_2d(self, height: int, width: int, device: Optional[torch.device] = None) -> Tensor:
        return rope_freqs_2d(height, width, self.head_dim, self.theta, device)

    def table(self, ids: Tensor) -> Tensor:
        if self.axes_dims is None:
            raise ValueError("RotaryEmbedding.table(ids) needs axes_dims at construction")
        return rope_freqs(ids, self.axes_dims, self.theta)

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        return rope(x, freqs, self.interleaved, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, theta={self.theta}, axes_dims={self.axes_dims}, "
                f"interleaved={self.interleaved}")

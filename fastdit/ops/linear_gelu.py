"""Linear layer followed by tanh-GELU, the first half of a DiT/MMDiT MLP:

    y = GELU_tanh(x @ weight.T + bias)

Shapes: ``x: (..., in)``, ``weight: (out, in)``, ``bias: (out,)`` or None; returns ``(..., out)``.

The fast path is cuBLASLt's GELU epilogue (``torch._addmm_activation(..., use_gelu=True)``, the tanh
approximation on CUDA): the activation is applied as the GEMM writes its tile, so the (tokens × 4·dim)
pre-activation is never written and read back. Measured at DiT-XL/2's fc1 (32768 × 1152 → 4608, bf16, H100):
GEMM then GELU 702 µs, the epilogue 578 µs (issue 15). torch.compile keeps it as one extern call (Inductor
falls back to the ATen op rather than decomposing it). It runs **forward only**: the backward of GELU needs
the pre-activation, which the epilogue does not keep (cuBLASLt's GELU_AUX output is not exposed by torch), so
anything that needs a gradient takes the reference.

Under autocast the GEMM runs in the autocast dtype, as ``F.linear`` would.

Layers (see design.md §3): ``linear_gelu_ref`` (ground truth, same signature) · ``linear_gelu`` (the entry
with the backend switch). There is no library op: the fast path is one ATen op already.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.ops._common import check_linear_inputs, join_reasons, needs_grad, use_triton

_OP = "linear_gelu"


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_linear_inputs(_OP, x, weight, bias)


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference: ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``."""
    _check_inputs(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def fast_path_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why the cuBLASLt epilogue cannot take these inputs, or None."""
    return join_reasons(
        None if x.is_cuda else f"x is on {x.device}; the GELU epilogue is cuBLASLt's (CUDA)",
        "a gradient is needed; the epilogue keeps no pre-activation for GELU's backward (forward only)"
        if needs_grad(x, weight, bias) else None,
        None if x.numel() else "x is empty")


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None
                ) -> Tensor:
    """``GELU_tanh(x @ weight.T + bias)``; x (..., in), weight (out, in), bias (out,) or None.

    ``backend``: ``"auto"`` takes the GELU epilogue where it can run (CUDA, no gradient needed) and the
    reference elsewhere; ``"triton"`` (the fast path) raises where it cannot; ``"reference"``: plain PyTorch.
    """
    _check_inputs(x, weight, bias)
    if not use_triton(_OP, backend, lambda: fast_path_reason(x, weight, bias), True):
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        b = torch.zeros(weight.shape[0], dtype=dtype, device=x.device) if bias is None else bias.to(dtype)
        out = torch._addmm_activation(b, x2, w.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])

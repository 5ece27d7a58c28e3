"""RMSNorm over the last dimension with a learned scale: the per-head QK-norm of SD3.5/Flux.

    y = x / sqrt(mean(x^2) + eps) * weight

Shapes: ``x: (..., d)`` (typically (B, N, H, head_dim)); ``weight: (d,)``, any floating dtype.
Output in x's dtype; math in float32 (float64 for float64 inputs). Same result as ``torch.nn.RMSNorm``
up to its lower-precision arithmetic on half inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, join_reasons,
                                 kernel_can_run, library_op, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 triton_dtype_reason, use_triton)

KERNEL_READY = True  # fastdit.kernels.qk_norm_rope, norm only
MAX_TRITON_D = 16384
_OP = "rms_norm"


def _check_inputs(x: Tensor, weight: Tensor) -> None:
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() >= 1 and x.shape[-1] > 0
            and x.is_floating_point() and weight.is_floating_point() and weight.dim() == 1
            and weight.shape[0] == x.shape[-1] and weight.device == x.device):
        return  # the common case, without building any message
    check_floating(_OP, x=x, weight=weight)
    check_same_device(_OP, x=x, weight=weight)
    check(x.dim() >= 1 and x.shape[-1] > 0, _OP,
          lambda: f"x needs a non-empty last dimension, got shape {shape_str(x)}")
    check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], _OP,
          lambda: f"weight must be 1-D with x's last dimension ({x.shape[-1]}), got {shape_str(weight)}")


def _forward_math(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    acc = compute_dtype(x, weight)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd.unsqueeze(-1) * weight.to(acc)).to(x.dtype), rstd


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Reference RMSNorm of the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``."""
    _check_inputs(x, weight)
    return _forward_math(x, weight, eps)[0]


def rms_norm_backward_ref(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Reference backward: (dx, dweight); dweight sums over every row in float32.

    dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight,  xhat = x * rstd.
    """
    acc = rstd.dtype
    xhat = x.to(acc) * rstd.unsqueeze(-1)
    dyf = dy.to(acc)
    g = dyf * weight.to(acc)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dweight.to(weight.dtype)


def _as_heads(x: Tensor) -> Tensor:
    """The kernel's (B, N, H, d) view of x (..., d): 4-D inputs as they are (any strides), others as
    (1, rows, 1, d)."""
    return x if x.dim() == 4 else x.reshape(1, -1, 1, x.shape[-1])


# The fast path (kernel, or reference math where it cannot run), wrapped as a torch.library op (for
# torch.compile, opcheck) and as an autograd.Function (eager calls): see fastdit.ops.adaln.

def _forward_impl(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    if kernel_can_run(x, weight):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_fwd
        y, _, rstd, _ = qk_norm_rope_fwd(_as_heads(x), q_weight=weight, eps=eps)
        return y.view(x.shape), rstd.view(x.shape[:-1])
    return owned_outputs(_forward_math(x, weight, eps), (x, weight))


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
    if kernel_can_run(dy, x, weight):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_bwd
        x4 = _as_heads(x)
        dx, _, dweight, _ = qk_norm_rope_bwd(_as_heads(dy), None, x4, None, weight, None, None,
                                             rstd.reshape(x4.shape[:-1]), None)
        return dx.view(x.shape), dweight
    return owned_outputs(rms_norm_backward_ref(dy, x, weight, rstd), (dy, x, weight, rstd))


def _forward_fake(x, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=compute_dtype(x, weight)))


def _backward_fake(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


_rms_norm_op = library_op("rms_norm", _forward_impl, _forward_fake)
_rms_norm_backward_op = library_op("rms_norm_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = torch.ops.fastdit.rms_norm_backward(dy, x, weight, rstd)
    return dx, dweight, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _RMSNormFunction(torch.autograd.Function):
    """Eager fast path (see fastdit.ops.adaln._AdaLNFunction)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _forward_impl(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_backward_impl(dy, *ctx.saved_tensors), None)


def triton_unsupported_reason(x: Tensor, weight: Tensor) -> Optional[str]:
    return join_reasons(
        triton_device_reason(x), triton_dtype_reason(x=x, weight=weight),
        f"last dimension {x.shape[-1]} is larger than the kernel's limit of {MAX_TRITON_D}"
        if x.shape[-1] > MAX_TRITON_D else None)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: Optional[str] = None) -> Tensor:
    """RMSNorm of the last dim with learned ``weight``; x: (..., d), weight: (d,)."""
    _check_inputs(x, weight)
    if use_triton(_OP, backend, lambda: triton_unsupported_reason(x, weight), KERNEL_READY and x.is_cuda,
                  lambda: (x.numel(), needs_grad(x, weight))):
        if torch.compiler.is_compiling():
            return torch.ops.fastdit.rms_norm(x, weight, eps)[0]
        if needs_grad(x, weight):
            return _RMSNormFunction.apply(x, weight, eps)
        return _forward_impl(x, weight, eps)[0]
    return _forward_math(x, weight, eps)[0]

"""Gated residual followed by AdaLN modulation: the seam between two DiT sublayers.

    x' = x + gate * y                       (rounded to x's dtype: it is the residual stream)
    out = LN(x') * (1 + scale) + shift      (LN of x' as stored, so out == adaln_modulate(x'))

Shapes: ``x, y: (B, N, D)``; ``gate, shift, scale: (B, D)`` or ``(B, N, D)``, all three the same shape.
``y`` and the modulation may have other floating dtypes than ``x`` (under bf16 autocast the residual
stream x is fp32 while y and the modulation come out of Linear layers in bf16).
Returns ``(x', out)``, both in ``x``'s dtype. Math in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, join_reasons,
                                 kernel_can_run, library_op, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 triton_dtype_reason, use_triton)
from fastdit.ops.adaln import (MAX_TRITON_D, _adaln_forward_math, check_modulation_inputs,
                               layer_norm_modulate_backward_math, per_token, reduce_to)

KERNEL_READY = True  # fastdit.kernels.adaln, gated form

_OP = "gated_residual_adaln"


def _check_inputs(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> None:
    if (isinstance(y, Tensor) and isinstance(x, Tensor) and y.shape == x.shape and y.is_floating_point()
            and y.device == x.device):
        check_modulation_inputs(_OP, x, gate=gate, shift=shift, scale=scale)
        return
    check_floating(_OP, y=y)
    check_same_device(_OP, x=x, y=y)
    check(y.shape == x.shape, _OP, lambda: f"y must have x's shape {shape_str(x)}, got {shape_str(y)}")
    check_modulation_inputs(_OP, x, gate=gate, shift=shift, scale=scale)


def _gated_forward_math(x, y, gate, shift, scale, eps):
    acc = compute_dtype(x, y, gate, shift, scale)
    x_new = (x.to(acc) + per_token(gate).to(acc) * y.to(acc)).to(x.dtype)
    out, mean, rstd = _adaln_forward_math(x_new, shift, scale, eps)
    return x_new, out, mean.to(acc), rstd.to(acc)


def gated_residual_adaln_ref(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                             eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Reference: returns ``(x + gate*y, adaln_modulate(x + gate*y, shift, scale))``."""
    _check_inputs(x, y, gate, shift, scale)
    x_new, out, _, _ = _gated_forward_math(x, y, gate, shift, scale, eps)
    return x_new, out


def gated_residual_adaln_backward_ref(dx_new: Tensor, dout: Tensor, x_new: Tensor, y: Tensor, gate: Tensor,
                                      shift: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference backward: (dx, dy, dgate, dshift, dscale) in the dtypes of the inputs.

    The gradient reaching x' (from its own consumer plus from the LayerNorm path) stays in float32
    until the end; per-sample dgate/dshift/dscale are float32 sums over tokens.
    """
    acc = mean.dtype
    dx_ln, dshift, dscale = layer_norm_modulate_backward_math(dout, x_new.to(acc), scale, mean, rstd)
    dtotal = dx_ln + dx_new.to(acc)
    dy = dtotal * per_token(gate).to(acc)
    dgate = dtotal * y.to(acc)
    return (dtotal.to(x_new.dtype), dy.to(y.dtype), reduce_to(dgate, gate).to(gate.dtype),
            reduce_to(dshift, shift).to(shift.dtype), reduce_to(dscale, scale).to(scale.dtype))


# The fast path (kernel, or reference math where it cannot run), wrapped as a torch.library op (for
# torch.compile, opcheck) and as an autograd.Function (eager calls): see fastdit.ops.adaln.


def _forward_impl(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if kernel_can_run(x, y, gate, shift, scale):
        from fastdit.kernels.adaln import adaln_fwd
        return adaln_fwd(x, shift, scale, eps, res=y, gate=gate)
    return owned_outputs(_gated_forward_math(x, y, gate, shift, scale, eps), (x, y, gate, shift, scale))


def _backward_impl(dx_new: Tensor, dout: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, shift: Tensor,
                   scale: Tensor, mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = (dx_new, dout, x_new, y, gate, shift, scale, mean, rstd)
    if kernel_can_run(dx_new, dout, x_new, y, gate, shift, scale):
        from fastdit.kernels.adaln import adaln_bwd
        return adaln_bwd(dout, x_new, shift, scale, mean, rstd, res=y, gate=gate, dx_new=dx_new)
    return owned_outputs(gated_residual_adaln_backward_ref(*inputs), inputs)


def _forward_fake(x, y, gate, shift, scale, eps):
    acc = compute_dtype(x, y, gate, shift, scale)
    B, N, _ = x.shape
    like_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like_x, torch.empty_like(like_x), x.new_empty((B, N), dtype=acc), x.new_empty((B, N), dtype=acc)


def _backward_fake(dx_new, dout, x_new, y, gate, shift, scale, mean, rstd):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x_new, y, gate, shift, scale))


_gated_op = library_op(_OP, _forward_impl, _forward_fake)
_gated_backward_op = library_op(_OP + "_backward", _backward_impl, _backward_fake)


def _gated_setup_context(ctx, inputs, output):
    _, y, gate, shift, scale, _ = inputs
    x_new, _, mean, rstd = output
    # x' is saved instead of x: the LayerNorm backward needs x', and x' = x + gate*y is not free.
    ctx.save_for_backward(x_new, y, gate, shift, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _gated_backward(ctx, dx_new, dout, _dmean, _drstd):
    x_new, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
    if dx_new is None:  # x' unused downstream
        dx_new = torch.zeros_like(x_new)
    if dout is None:
        dout = torch.zeros_like(x_new)
    grads = torch.ops.fastdit.gated_residual_adaln_backward(dx_new, dout, x_new, y, gate, shift, scale, mean, rstd)
    return (*grads, None)


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


class _GatedFunction(torch.autograd.Function):
    """Eager fast path (see fastdit.ops.adaln._AdaLNFunction). Unused outputs get zero gradients."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        x_new, out, mean, rstd = _forward_impl(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x_new, y, gate, shift, scale, mean, rstd)
        return x_new, out

    @staticmethod
    def backward(ctx, dx_new, dout):
        x_new, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
        return (*_backward_impl(dx_new, dout, x_new, y, gate, shift, scale, mean, rstd), None)


def triton_unsupported_reason(x, y, gate, shift, scale) -> Optional[str]:
    return join_reasons(
        triton_device_reason(x), triton_dtype_reason(x=x, y=y, gate=gate, shift=shift, scale=scale),
        f"D = {x.shape[-1]} is larger than the kernel's limit of {MAX_TRITON_D}"
        if x.shape[-1] > MAX_TRITON_D else None)


def gated_residual_adaln(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                         *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``x' = x + gate*y``; returns ``(x', LN(x') * (1 + scale) + shift)``.

    x, y: (B, N, D); gate, shift, scale: (B, D) or (B, N, D). ``backend`` as in :mod:`fastdit.backend`.
    """
    _check_inputs(x, y, gate, shift, scale)
    if use_triton(_OP, backend, lambda: triton_unsupported_reason(x, y, gate, shift, scale),
                  KERNEL_READY and x.is_cuda, lambda: (x.numel(), needs_grad(x, y, gate, shift, scale))):
        if torch.compiler.is_compiling():
            x_new, out, _, _ = torch.ops.fastdit.gated_residual_adaln(x, y, gate, shift, scale, eps)
            return x_new, out
        if needs_grad(x, y, gate, shift, scale):
            return _GatedFunction.apply(x, y, gate, shift, scale, eps)
        return _forward_impl(x, y, gate, shift, scale, eps)[:2]
    x_new, out, _, _ = _gated_forward_math(x, y, gate, shift, scale, eps)
    return x_new, out

"""AdaLN modulation: LayerNorm without affine, then per-sample (or per-token) scale and shift.

    y = LN(x) * (1 + scale) + shift          LN(x) = (x - mean(x)) / sqrt(var(x) + eps)

Shapes: ``x: (B, N, D)``; ``shift, scale: (B, D)`` (per sample, broadcast over the N tokens) or
``(B, N, D)`` (per token), both the same shape. ``x`` in float32/bfloat16/float16; ``shift``/``scale``
in any floating dtype (bf16 activations with fp32 modulation is common in DiT training; under bf16
autocast it is the other way round: an fp32 residual stream with bf16 modulation).
The output has ``x``'s dtype; the math runs in float32 (float64 for float64 inputs).

Layers (see design.md §3): ``adaln_modulate_ref`` (ground truth, same signature as the fast op) ·
``torch.ops.fastdit.adaln_modulate`` (library op with autograd and a fake impl) ·
``adaln_modulate`` (functional entry with the backend switch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, join_reasons,
                                 kernel_can_run, library_op, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 triton_dtype_reason, use_triton)

# A Triton kernel backs the library op (fastdit.kernels.adaln): "auto" takes it on CUDA.
KERNEL_READY = True
# Largest feature size the Triton kernel takes (a whole row lives in one program's registers).
MAX_TRITON_D = 16384


def _modulation_inputs_ok(x, modulation) -> bool:
    """The common case, checked cheaply (no message is built unless something is wrong)."""
    if not (isinstance(x, Tensor) and x.dim() == 3 and x.is_floating_point() and x.shape[2] > 0):
        return False
    B, N, D = x.shape
    first = None
    for t in modulation.values():
        if not (isinstance(t, Tensor) and t.is_floating_point() and t.device == x.device):
            return False
        if first is None:
            first = t.shape
        if t.shape != first or not (t.shape == (B, D) or t.shape == (B, N, D)):
            return False
    return True


def check_modulation_inputs(op: str, x: Tensor, **modulation: Tensor) -> None:
    """x is (B, N, D); every modulation tensor is (B, D) or (B, N, D), all the same shape."""
    if _modulation_inputs_ok(x, modulation):
        return
    check_floating(op, x=x, **modulation)
    check_same_device(op, x=x, **modulation)
    check(x.dim() == 3, op, lambda: f"x must be 3-D (B, N, D), got shape {shape_str(x)}")
    B, N, D = x.shape
    check(D > 0, op, "x has an empty feature dimension (D = 0)")
    shapes = {name: tuple(t.shape) for name, t in modulation.items()}
    first_name, first = next(iter(shapes.items()))
    for name, t in modulation.items():
        check(tuple(t.shape) in ((B, D), (B, N, D)), op,
              lambda: f"{name} must be (B, D) = ({B}, {D}) or (B, N, D) = ({B}, {N}, {D}) to match x, "
                      f"got {shape_str(t)}")
        check(tuple(t.shape) == first, op,
              lambda: f"{name} has shape {shape_str(t)} but {first_name} has {tuple(first)}: use one form for all")


def per_token(m: Tensor) -> Tensor:
    """(B, D) -> (B, 1, D) so it broadcasts over tokens; (B, N, D) unchanged."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a per-token gradient (B, N, D) over tokens when the parameter was per sample (B, D)."""
    return grad.sum(1) if like.dim() == 2 else grad


def layer_norm_stats(xf: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """mean and 1/sqrt(var + eps) over the last dim (biased variance, as LayerNorm)."""
    mean = xf.mean(-1)
    var = (xf - mean.unsqueeze(-1)).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Reference: ``LN(x) * (1 + scale) + shift`` in float32 math, returned in ``x.dtype``.

    x: (B, N, D); shift, scale: (B, D) or (B, N, D). Differentiable through ordinary autograd.
    """
    check_modulation_inputs("adaln_modulate", x, shift=shift, scale=scale)
    return _adaln_forward_math(x, shift, scale, eps)[0]


def _adaln_forward_math(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); mean/rstd are (B, N) in the compute dtype."""
    acc = compute_dtype(x, shift, scale)
    xf = x.to(acc)
    mean, rstd = layer_norm_stats(xf, eps)
    xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    y = xhat * (1 + per_token(scale).to(acc)) + per_token(shift).to(acc)
    return y.to(x.dtype), mean, rstd


def layer_norm_modulate_backward_math(dy: Tensor, xf: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
                                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``LN(x) * (1 + scale) + shift`` as full (B, N, D) tensors in the compute dtype.

    Returns (dx, dshift_per_token, dscale_per_token); reduce the last two with :func:`reduce_to`.
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * (1 + scale).
    """
    acc = xf.dtype
    dy = dy.to(acc)
    xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dy * (1 + per_token(scale).to(acc))
    dx = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dy, dy * xhat


def adaln_modulate_backward_ref(dy: Tensor, x: Tensor, shift: Tensor, scale: Tensor, mean: Tensor,
                                rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference backward: (dx, dshift, dscale) in the dtypes of (x, shift, scale).

    Per-sample dshift/dscale are sums over tokens, accumulated in float32.
    """
    xf = x.to(mean.dtype)
    dx, dshift, dscale = layer_norm_modulate_backward_math(dy, xf, scale, mean, rstd)
    return dx.to(x.dtype), reduce_to(dshift, shift).to(shift.dtype), reduce_to(dscale, scale).to(scale.dtype)


# --------------------------------------------------------------------------------------------------
# The fast path: the Triton kernel where it can run, the reference math elsewhere (float64, say).
# Wrapped twice with the same functions: a torch.library op (for torch.compile, opcheck) and an
# autograd.Function (eager calls, with far less host overhead).


def _forward_impl(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    if kernel_can_run(x, shift, scale):
        from fastdit.kernels.adaln import adaln_fwd
        return adaln_fwd(x, shift, scale, eps)
    return owned_outputs(_adaln_forward_math(x, shift, scale, eps), (x, shift, scale))


def _backward_impl(dy: Tensor, x: Tensor, shift: Tensor, scale: Tensor, mean: Tensor,
                   rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if kernel_can_run(dy, x, shift, scale):
        from fastdit.kernels.adaln import adaln_bwd
        return adaln_bwd(dy, x, shift, scale, mean, rstd)
    return owned_outputs(adaln_modulate_backward_ref(dy, x, shift, scale, mean, rstd),
                         (dy, x, shift, scale, mean, rstd))


def _forward_fake(x, shift, scale, eps):
    acc = compute_dtype(x, shift, scale)
    B, N, _ = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((B, N), dtype=acc), \
        x.new_empty((B, N), dtype=acc)


def _backward_fake(dy, x, shift, scale, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(shift, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format))


_adaln_modulate_op = library_op("adaln_modulate", _forward_impl, _forward_fake)
_adaln_modulate_backward_op = library_op("adaln_modulate_backward", _backward_impl, _backward_fake)


def _adaln_setup_context(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _adaln_backward(ctx, dy, _dmean, _drstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.fastdit.adaln_modulate_backward(dy, x, shift, scale, mean, rstd)
    return dx, dshift, dscale, None


_adaln_modulate_op.register_autograd(_adaln_backward, setup_context=_adaln_setup_context)


class _AdaLNFunction(torch.autograd.Function):
    """Eager fast path: the library op's implementation, without its Python-level autograd wrapper."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = _forward_impl(x, shift, scale, eps)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_backward_impl(dy, *ctx.saved_tensors), None)


def triton_unsupported_reason(x: Tensor, shift: Tensor, scale: Tensor) -> Optional[str]:
    """Why the Triton kernel cannot take these (already validated) inputs, or None."""
    return join_reasons(
        triton_device_reason(x), triton_dtype_reason(x=x, shift=shift, scale=scale),
        f"D = {x.shape[-1]} is larger than the kernel's limit of {MAX_TRITON_D}"
        if x.shape[-1] > MAX_TRITON_D else None)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                   backend: Optional[str] = None) -> Tensor:
    """``LN(x) * (1 + scale) + shift``; x: (B, N, D), shift/scale: (B, D) or (B, N, D).

    ``backend``: ``"auto" | "triton" | "reference"`` or None for the global default
    (see :mod:`fastdit.backend`).
    """
    check_modulation_inputs("adaln_modulate", x, shift=shift, scale=scale)
    if use_triton("adaln_modulate", backend, lambda: triton_unsupported_reason(x, shift, scale),
                  KERNEL_READY and x.is_cuda, lambda: (x.numel(), needs_grad(x, shift, scale))):
        if torch.compiler.is_compiling():
            return torch.ops.fastdit.adaln_modulate(x, shift, scale, eps)[0]
        if needs_grad(x, shift, scale):
            return _AdaLNFunction.apply(x, shift, scale, eps)
        return _forward_impl(x, shift, scale, eps)[0]
    return _adaln_forward_math(x, shift, scale, eps)[0]

"""LN-modulate (plain, or behind the gated residual) that also emits its output quantised to FP8 per row: the
producer of an FP8 GEMM's input (qkv and fc1 of a DiT block run as FP8 GEMMs, issue 16).

    adaln_modulate_fp8:        out = LN(x) * (1 + scale) + shift
    gated_residual_adaln_fp8:  x' = x + gate * y;  out = LN(x') * (1 + scale) + shift
    both also return           (out_q, q_scale) = quantize_rows(out)      (fastdit.ops.fp8_linear)

``out_q`` (B, N, D) in the fp8 dtype and ``q_scale`` fp32 (B, N, 1) are exactly
``fastdit.ops.fp8_linear.quantize_rows(out.reshape(-1, D))`` reshaped: the quantisation of ``out`` *as
stored* in x's dtype, so ``fp8_linear(out, w, x_fp8=(out_q, q_scale))`` computes what ``fp8_linear(out, w)``
computes, without a second pass over ``out``. The fp8 outputs carry no gradient (the FP8 GEMM's backward
sends its gradient to ``out``); the gradients of everything else are those of ``adaln_modulate`` /
``gated_residual_adaln`` (the same backward kernels).

The fast path is fastdit's LN-modulate kernel with its quantising epilogue (``fastdit.kernels.adaln``,
``quantize=``): the row's amax is taken in registers, where the whole row already is for the LayerNorm.

Layers (design.md §3): ``*_ref`` (reference: the unfused ops, same signature) · ``fastdit::adaln_modulate_fp8``
and ``fastdit::gated_residual_adaln_fp8`` library ops (torch.compile) and autograd Functions (eager) · the
entries ``adaln_modulate_fp8`` / ``gated_residual_adaln_fp8`` with the backend switch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdit.ops import adaln as _adaln
from fastdit.ops import gated_adaln as _gated
from fastdit.ops._common import check, kernel_can_run, library_op, needs_grad, owned_outputs, use_triton
from fastdit.ops.adaln import check_modulation_inputs

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _fp8_name(op: str, fp8_dtype: torch.dtype) -> str:
    for name, dtype in FP8_DTYPES.items():
        if dtype == fp8_dtype:
            return name
    check(False, op, f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    return ""


def _amax_eps() -> float:
    from fastdit.ops.fp8_linear import EPS
    return EPS


def _quantize(out: Tensor, fp8_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    from fastdit.ops.fp8_linear import quantize_rows

    B, N, D = out.shape
    data, scale = quantize_rows(out.reshape(B * N, D), fp8_dtype)
    return data.view(B, N, D), scale.view(B, N, 1)


# ------------------------------------------------------------------------------------------- references

def adaln_modulate_fp8_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                           fp8_dtype: torch.dtype = torch.float8_e4m3fn, backend: Optional[str] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference: ``out = adaln_modulate_ref(x, shift, scale, eps)``, then ``quantize_rows(out)``.
    Returns (out (B, N, D) in x's dtype, out_q (B, N, D) in ``fp8_dtype``, q_scale fp32 (B, N, 1))."""
    _fp8_name("adaln_modulate_fp8", fp8_dtype)
    out = _adaln.adaln_modulate_ref(x, shift, scale, eps)
    return (out, *_quantize(out.detach(), fp8_dtype))


def gated_residual_adaln_fp8_ref(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                 eps: float = 1e-6, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(x', out) = gated_residual_adaln_ref(...)``, then ``quantize_rows(out)``.
    Returns (x', out, out_q, q_scale)."""
    _fp8_name("gated_residual_adaln_fp8", fp8_dtype)
    x_new, out = _gated.gated_residual_adaln_ref(x, y, gate, shift, scale, eps)
    return (x_new, out, *_quantize(out.detach(), fp8_dtype))


# ------------------------------------------------------------------------------- the fast path's layers

def _plain_impl(x: Tensor, shift: Tensor, scale: Tensor, eps: float, fp8: str
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, out_q, q_scale)."""
    dtype = FP8_DTYPES[fp8]
    if kernel_can_run(x, shift, scale):
        from fastdit.kernels.adaln import adaln_fwd
        return adaln_fwd(x, shift, scale, eps, quantize=dtype, amax_eps=_amax_eps())
    out, mean, rstd = _adaln._adaln_forward_math(x, shift, scale, eps)
    return owned_outputs((out, mean, rstd, *_quantize(out, dtype)), (x, shift, scale))


def _gated_impl(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, fp8: str
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x', out, mean, rstd, out_q, q_scale)."""
    dtype = FP8_DTYPES[fp8]
    if kernel_can_run(x, y, gate, shift, scale):
        from fastdit.kernels.adaln import adaln_fwd
        return adaln_fwd(x, shift, scale, eps, res=y, gate=gate, quantize=dtype, amax_eps=_amax_eps())
    x_new, out, mean, rstd = _gated._gated_forward_math(x, y, gate, shift, scale, eps)
    return owned_outputs((x_new, out, mean, rstd, *_quantize(out, dtype)), (x, y, gate, shift, scale))


def _fp8_outputs_fake(x: Tensor, fp8: str):
    B, N, D = x.shape
    return x.new_empty((B, N, D), dtype=FP8_DTYPES[fp8]), x.new_empty((B, N, 1), dtype=torch.float32)


def _plain_fake(x, shift, scale, eps, fp8):
    return (*_adaln._forward_fake(x, shift, scale, eps), *_fp8_outputs_fake(x, fp8))


def _gated_fake(x, y, gate, shift, scale, eps, fp8):
    return (*_gated._forward_fake(x, y, gate, shift, scale, eps), *_fp8_outputs_fake(x, fp8))


_plain_op = library_op("adaln_modulate_fp8", _plain_impl, _plain_fake)
_gated_op = library_op("gated_residual_adaln_fp8", _gated_impl, _gated_fake)


def _plain_setup_context(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd, out_q, q_scale = output
    ctx.save_for_backward(x, shift, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd, out_q, q_scale)


def _plain_backward(ctx, dout, _dmean, _drstd, _dq, _dscale):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.fastdit.adaln_modulate_backward(dout, x, shift, scale, mean, rstd)
    return dx, dshift, dscale, None, None


def _gated_setup_context(ctx, inputs, output):
    _, y, gate, shift, scale, _, _ = inputs
    x_new, _, mean, rstd, out_q, q_scale = output
    ctx.save_for_backward(x_new, y, gate, shift, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd, out_q, q_scale)


def _gated_backward(ctx, dx_new, dout, _dmean, _drstd, _dq, _dscale):
    x_new, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
    dx_new = torch.zeros_like(x_new) if dx_new is None else dx_new
    dout = torch.zeros_like(x_new) if dout is None else dout
    grads = torch.ops.fastdit.gated_residual_adaln_backward(dx_new, dout, x_new, y, gate, shift, scale, mean, rstd)
    return (*grads, None, None)


_plain_op.register_autograd(_plain_backward, setup_context=_plain_setup_context)
_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


class _PlainFunction(torch.autograd.Function):
    """Eager fast path (as fastdit.ops.adaln._AdaLNFunction); out_q and q_scale carry no gradient."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, fp8):
        out, mean, rstd, out_q, q_scale = _plain_impl(x, shift, scale, eps, fp8)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        ctx.mark_non_differentiable(out_q, q_scale)
        return out, out_q, q_scale

    @staticmethod
    def backward(ctx, dout, _dq, _dscale):
        return (*_adaln._backward_impl(dout, *ctx.saved_tensors), None, None)


class _GatedFunction(torch.autograd.Function):
    """Eager fast path (as fastdit.ops.gated_adaln._GatedFunction); out_q and q_scale carry no gradient."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps, fp8):
        x_new, out, mean, rstd, out_q, q_scale = _gated_impl(x, y, gate, shift, scale, eps, fp8)
        ctx.save_for_backward(x_new, y, gate, shift, scale, mean, rstd)
        ctx.mark_non_differentiable(out_q, q_scale)
        return x_new, out, out_q, q_scale

    @staticmethod
    def backward(ctx, dx_new, dout, _dq, _dscale):
        x_new, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
        dx_new = torch.zeros_like(x_new) if dx_new is None else dx_new
        dout = torch.zeros_like(x_new) if dout is None else dout
        return (*_gated._backward_impl(dx_new, dout, x_new, y, gate, shift, scale, mean, rstd), None, None)


# ------------------------------------------------------------------------------------------------ entries

def adaln_modulate_fp8(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                       fp8_dtype: torch.dtype = torch.float8_e4m3fn, backend: Optional[str] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """``out = LN(x) * (1 + scale) + shift`` and its per-row FP8 quantisation: returns (out, out_q, q_scale).
    x: (B, N, D); shift/scale: (B, D) or (B, N, D); out_q (B, N, D) in ``fp8_dtype``; q_scale fp32 (B, N, 1).
    ``backend`` as in :mod:`fastdit.backend` (the same choice as ``adaln_modulate``'s)."""
    check_modulation_inputs("adaln_modulate_fp8", x, shift=shift, scale=scale)
    fp8 = _fp8_name("adaln_modulate_fp8", fp8_dtype)
    if use_triton("adaln_modulate_fp8", backend, lambda: _adaln.triton_unsupported_reason(x, shift, scale),
                  _adaln.KERNEL_READY and x.is_cuda, lambda: (x.numel(), needs_grad(x, shift, scale))):
        if torch.compiler.is_compiling():
            out, _, _, out_q, q_scale = torch.ops.fastdit.adaln_modulate_fp8(x, shift, scale, eps, fp8)
            return out, out_q, q_scale
        if needs_grad(x, shift, scale):
            return _PlainFunction.apply(x, shift, scale, eps, fp8)
        out, _, _, out_q, q_scale = _plain_impl(x, shift, scale, eps, fp8)
        return out, out_q, q_scale
    return adaln_modulate_fp8_ref(x, shift, scale, eps, fp8_dtype=fp8_dtype)


def gated_residual_adaln_fp8(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                             *, fp8_dtype: torch.dtype = torch.float8_e4m3fn, backend: Optional[str] = None
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x' = x + gate*y``, ``out = LN(x') * (1 + scale) + shift`` and out's per-row FP8 quantisation: returns
    (x', out, out_q, q_scale). Shapes as :func:`fastdit.ops.gated_residual_adaln` plus those of
    :func:`adaln_modulate_fp8`."""
    _gated._check_inputs(x, y, gate, shift, scale)
    fp8 = _fp8_name("gated_residual_adaln_fp8", fp8_dtype)
    if use_triton("gated_residual_adaln_fp8", backend,
                  lambda: _gated.triton_unsupported_reason(x, y, gate, shift, scale),
                  _gated.KERNEL_READY and x.is_cuda, lambda: (x.numel(), needs_grad(x, y, gate, shift, scale))):
        if torch.compiler.is_compiling():
            x_new, out, _, _, out_q, q_scale = torch.ops.fastdit.gated_residual_adaln_fp8(
                x, y, gate, shift, scale, eps, fp8)
            return x_new, out, out_q, q_scale
        if needs_grad(x, y, gate, shift, scale):
            return _GatedFunction.apply(x, y, gate, shift, scale, eps, fp8)
        x_new, out, _, _, out_q, q_scale = _gated_impl(x, y, gate, shift, scale, eps, fp8)
        return x_new, out, out_q, q_scale
    return gated_residual_adaln_fp8_ref(x, y, gate, shift, scale, eps, fp8_dtype=fp8_dtype)

"""QK-norm + RoPE of q and k, fused: what SD3.5/Flux apply to queries and keys before attention.

    q' = rope(rms_norm(q, q_weight)),  k' = rope(rms_norm(k, k_weight))

Either part is optional: no weights = rotation only; no table = norm only. Shapes: q, k (B, N, H, d)
(any strides, typically views of a fused QKV projection); q_weight, k_weight (d,) or both None;
freqs (N, d/2, 2) or (B, N, d/2, 2) float32 or None (see :mod:`fastdit.ops.rotary`). Outputs in
q's/k's dtype; math in float32. The fast path is one Triton launch for both tensors, forward and
backward (fastdit.kernels.qk_norm_rope).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdit.ops import rmsnorm, rotary
from fastdit.ops._common import (check, check_floating, check_same_device, join_reasons, kernel_can_run,
                                 library_op, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 triton_dtype_reason, use_triton)

KERNEL_READY = True
_OP = "qk_norm_rope"


def _inputs_ok(q, k, q_weight, k_weight, freqs) -> bool:
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.shape == q.shape
            and q.is_floating_point() and k.is_floating_point() and k.device == q.device
            and (q_weight is None) == (k_weight is None)):
        return False
    d = q.shape[-1]
    for w in (q_weight, k_weight):
        if w is not None and not (isinstance(w, Tensor) and w.is_floating_point() and w.dim() == 1
                                  and w.shape[0] == d and w.device == q.device):
            return False
    return freqs is None or rotary._inputs_ok(q, freqs)


def _check_inputs(q, k, q_weight, k_weight, freqs) -> None:
    if _inputs_ok(q, k, q_weight, k_weight, freqs):
        return  # the common case, without building any message
    check_floating(_OP, q=q, k=k, q_weight=q_weight, k_weight=k_weight, freqs=freqs)
    check_same_device(_OP, q=q, k=k, q_weight=q_weight, k_weight=k_weight, freqs=freqs)
    check(q.dim() == 4, _OP, lambda: f"q must be 4-D (B, N, H, d), got shape {shape_str(q)}")
    check(k.shape == q.shape, _OP, lambda: f"k must have q's shape {shape_str(q)}, got {shape_str(k)}")
    check((q_weight is None) == (k_weight is None), _OP, "give both q_weight and k_weight, or neither")
    d = q.shape[-1]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            check(w.dim() == 1 and w.shape[0] == d, _OP, lambda: f"{name} must be ({d},), got {shape_str(w)}")
    if freqs is not None:
        rotary._check_inputs(q, freqs)


def _forward_math(q, k, q_weight, k_weight, freqs, eps, interleaved):
    outs, rstds = [], []
    for x, w in ((q, q_weight), (k, k_weight)):
        rstd = x.new_empty((0,), dtype=torch.float32)
        if w is not None:
            x, rstd = rmsnorm._forward_math(x, w, eps)
        if freqs is not None:
            x = rotary._forward_math(x, freqs, interleaved, False)
        outs.append(x)
        rstds.append(rstd)
    return outs[0], outs[1], rstds[0], rstds[1]


def qk_norm_rope_ref(q: Tensor, k: Tensor, q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None,
                     freqs: Optional[Tensor] = None, eps: float = 1e-6, interleaved: bool = True
                     ) -> Tuple[Tensor, Tensor]:
    """Reference: ``rms_norm_ref`` (when weights are given) then ``rope_ref`` (when a table is given)."""
    _check_inputs(q, k, q_weight, k_weight, freqs)
    q_out, k_out, _, _ = _forward_math(q, k, q_weight, k_weight, freqs, eps, interleaved)
    return q_out, k_out


def _backward_math(dq_out, dk_out, q, k, q_weight, k_weight, freqs, q_rstd, k_rstd, interleaved):
    grads, dweights = [], []
    for g, x, w, rstd in ((dq_out, q, q_weight, q_rstd), (dk_out, k, k_weight, k_rstd)):
        if freqs is not None:
            g = rotary._forward_math(g, freqs, interleaved, True)
        dw = x.new_empty((0,))
        if w is not None:
            g, dw = rmsnorm.rms_norm_backward_ref(g, x, w, rstd)
        grads.append(g.to(x.dtype))
        dweights.append(dw)
    return grads[0], grads[1], dweights[0], dweights[1]


# The fast path (one kernel launch for q and k, or reference math where it cannot run), wrapped as a
# torch.library op (torch.compile, opcheck) and an autograd.Function (eager calls): see fastdit.ops.adaln.

def _forward_impl(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                  freqs: Optional[Tensor], eps: float, interleaved: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if kernel_can_run(q, k, q_weight, k_weight) and (freqs is None or freqs.dtype == torch.float32):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_fwd
        q_out, k_out, q_rstd, k_rstd = qk_norm_rope_fwd(q, k, q_weight, k_weight, freqs, eps, interleaved)
        if q_rstd is None:
            q_rstd, k_rstd = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
        return q_out, k_out, q_rstd, k_rstd
    return owned_outputs(_forward_math(q, k, q_weight, k_weight, freqs, eps, interleaved),
                         (q, k, q_weight, k_weight, freqs))


def _backward_impl(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Optional[Tensor],
                   k_weight: Optional[Tensor], freqs: Optional[Tensor], q_rstd: Tensor, k_rstd: Tensor,
                   interleaved: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    has_norm = q_weight is not None
    if kernel_can_run(dq_out, dk_out, q, k, q_weight, k_weight) and (freqs is None or freqs.dtype == torch.float32):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_bwd
        dq, dk, dqw, dkw = qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight, freqs,
                                            q_rstd if has_norm else None, k_rstd if has_norm else None, interleaved)
        if not has_norm:
            dqw, dkw = (q.new_empty((0,)) for _ in range(2))
        return dq, dk, dqw, dkw
    inputs = (dq_out, dk_out, q, k, q_weight, k_weight, freqs, q_rstd, k_rstd)
    return owned_outputs(_backward_math(dq_out, dk_out, q, k, q_weight, k_weight, freqs, q_rstd, k_rstd,
                                        interleaved), inputs)


def _forward_fake(q, k, q_weight, k_weight, freqs, eps, interleaved):
    acc = torch.promote_types(torch.float32, q.dtype)
    stats = q.shape[:-1] if q_weight is not None else (0,)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            q.new_empty(stats, dtype=acc), k.new_empty(stats, dtype=acc))


def _backward_fake(dq_out, dk_out, q, k, q_weight, k_weight, freqs, q_rstd, k_rstd, interleaved):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(q_weight) if q_weight is not None else q.new_empty((0,)),
            torch.empty_like(k_weight) if k_weight is not None else q.new_empty((0,)))


_qk_norm_rope_op = library_op("qk_norm_rope", _forward_impl, _forward_fake)
_qk_norm_rope_backward_op = library_op("qk_norm_rope_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, freqs, _, interleaved = inputs
    _, _, q_rstd, k_rstd = output
    ctx.save_for_backward(q, k, q_weight, k_weight, freqs, q_rstd, k_rstd)
    ctx.interleaved = interleaved
    ctx.mark_non_differentiable(q_rstd, k_rstd)


def _backward(ctx, dq_out, dk_out, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, freqs, q_rstd, k_rstd = ctx.saved_tensors
    dq, dk, dqw, dkw = torch.ops.fastdit.qk_norm_rope_backward(dq_out, dk_out, q, k, q_weight, k_weight, freqs,
                                                               q_rstd, k_rstd, ctx.interleaved)
    if q_weight is None:
        dqw = dkw = None
    return dq, dk, dqw, dkw, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


class _QKNormRopeFunction(torch.autograd.Function):
    """Eager fast path (see fastdit.ops.adaln._AdaLNFunction)."""

    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, freqs, eps, interleaved):
        q_out, k_out, q_rstd, k_rstd = _forward_impl(q, k, q_weight, k_weight, freqs, eps, interleaved)
        ctx.save_for_backward(q, k, q_weight, k_weight, freqs, q_rstd, k_rstd)
        ctx.interleaved = interleaved
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        q, k, q_weight, k_weight, freqs, q_rstd, k_rstd = ctx.saved_tensors
        dq, dk, dqw, dkw = _backward_impl(dq_out, dk_out, q, k, q_weight, k_weight, freqs, q_rstd, k_rstd,
                                          ctx.interleaved)
        if q_weight is None:
            dqw = dkw = None
        return dq, dk, dqw, dkw, None, None, None


def triton_unsupported_reason(q, k, q_weight, k_weight, freqs) -> Optional[str]:
    return join_reasons(
        triton_device_reason(q), triton_dtype_reason(q=q, k=k, q_weight=q_weight, k_weight=k_weight),
        f"freqs has dtype {freqs.dtype}; the kernel reads float32 tables (as rope_freqs* make them)"
        if freqs is not None and freqs.dtype != torch.float32 else None)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None,
                 freqs: Optional[Tensor] = None, eps: float = 1e-6, interleaved: bool = True, *,
                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Per-head RMSNorm (if weights are given) then RoPE (if ``freqs`` is given) of q and k; one launch
    on the fast path. q, k: (B, N, H, d). Returns (q', k')."""
    _check_inputs(q, k, q_weight, k_weight, freqs)
    if use_triton(_OP, backend, lambda: triton_unsupported_reason(q, k, q_weight, k_weight, freqs),
                  KERNEL_READY and q.is_cuda, lambda: (q.numel(), needs_grad(q, k, q_weight, k_weight))):
        if torch.compiler.is_compiling():
            q_out, k_out, _, _ = torch.ops.fastdit.qk_norm_rope(q, k, q_weight, k_weight, freqs, eps, interleaved)
            return q_out, k_out
        if needs_grad(q, k, q_weight, k_weight):
            return _QKNormRopeFunction.apply(q, k, q_weight, k_weight, freqs, eps, interleaved)
        return _forward_impl(q, k, q_weight, k_weight, freqs, eps, interleaved)[:2]
    q_out, k_out, _, _ = _forward_math(q, k, q_weight, k_weight, freqs, eps, interleaved)
    return q_out, k_out

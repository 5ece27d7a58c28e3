"""Rotary position embedding (RoPE) and its position tables.

A table ``freqs`` holds, for each token and each rotated pair of channels, ``[cos θ, sin θ]`` in float32,
shape ``(N, d/2, 2)`` (shared by the batch) or ``(B, N, d/2, 2)`` (per sample). It equals
``torch.view_as_real(torch.polar(1, θ))``: rotating a pair ``(a, b)`` by θ is multiplying ``a + ib`` by
``cos θ + i sin θ``. Tables are computed once (angles in float64, stored in float32) and reused by
every layer.

Channel pairs of a head of size d:

- ``interleaved=True`` (rotate-pairs, GPT-J/Flux): pair i is ``(x[2i], x[2i+1])``;
- ``interleaved=False`` (half-split, GPT-NeoX): pair i is ``(x[i], x[i + d/2])``.

Positions: :func:`rope_freqs_1d` for a sequence, :func:`rope_freqs_2d` for an h × w image grid (half the
pairs encode the row, half the column), :func:`rope_freqs` for Flux-style multi-axis ids. The table does
not depend on the layout, only the pairing of channels does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, fail, join_reasons,
                                 kernel_can_run, library_op, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 triton_dtype_reason, use_triton)

KERNEL_READY = True  # fastdit.kernels.qk_norm_rope, rotation only
_OP = "rope"


# ----------------------------------------------------------------------------------- position tables

def rope_freqs(ids: Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> Tensor:
    """Table for multi-axis positions (Flux's ``EmbedND``).

    ids: (N, A) or (B, N, A) positions (integer or float), one column per axis; axes_dims: A even
    channel counts, one per axis, summing to the head dim d. Axis a uses frequencies
    ``theta ** (-2k / axes_dims[a])`` for k < axes_dims[a] / 2. Returns (…, N, d/2, 2) float32.
    """
    axes_dims = [int(a) for a in axes_dims]
    if ids.dim() not in (2, 3) or ids.shape[-1] != len(axes_dims):
        fail("rope_freqs", f"ids must be (N, {len(axes_dims)}) or (B, N, {len(axes_dims)}) for "
                           f"{len(axes_dims)} axes, got {shape_str(ids)}")
    for a in axes_dims:
        check(a > 0 and a % 2 == 0, "rope_freqs",
              lambda: f"every axis needs a positive even channel count, got {axes_dims}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., axis].to(torch.float64).unsqueeze(-1) * omega)
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).to(torch.float32)


def rope_freqs_1d(n: int, dim: int, theta: float = 10000.0, offset: int = 0,
                  device: Optional[torch.device] = None) -> Tensor:
    """Table for positions ``offset … offset + n - 1`` of a sequence; head dim ``dim``. (n, dim/2, 2)."""
    ids = torch.arange(offset, offset + n, device=device).unsqueeze(-1)
    return rope_freqs(ids, [dim], theta)


def rope_freqs_2d(height: int, width: int, dim: int, theta: float = 10000.0,
                  device: Optional[torch.device] = None) -> Tensor:
    """Axial table for an image grid of ``height × width`` tokens in row-major order (the order of
    ``patchify(x).flatten(2)``): the first d/4 pairs rotate by the row index, the rest by the column.
    ``dim`` must be a multiple of 4. Returns (height*width, dim/2, 2)."""
    check(dim % 4 == 0, "rope_freqs_2d", lambda: f"2-D axial RoPE needs a head dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                indexing="ij")
    ids = torch.stack([rows, cols], dim=-1).reshape(height * width, 2)
    return rope_freqs(ids, [dim // 2, dim // 2], theta)


# ------------------------------------------------------------------------------------------ the op

def _inputs_ok(x: Tensor, freqs: Tensor) -> bool:
    if not (isinstance(x, Tensor) and isinstance(freqs, Tensor) and x.dim() == 4 and x.is_floating_point()
            and freqs.is_floating_point() and freqs.device == x.device and freqs.dim() in (3, 4)):
        return False
    B, N, _, d = x.shape
    return (d % 2 == 0 and freqs.shape[-3:] == (N, d // 2, 2)
            and (freqs.dim() == 3 or freqs.shape[0] == B or freqs.shape[0] == 1))


def _check_inputs(x: Tensor, freqs: Tensor) -> None:
    if _inputs_ok(x, freqs):
        return  # the common case, without building any message
    check_floating(_OP, x=x, freqs=freqs)
    check_same_device(_OP, x=x, freqs=freqs)
    check(x.dim() == 4, _OP, lambda: f"x must be 4-D (B, N, H, d), got shape {shape_str(x)}")
    B, N, _, d = x.shape
    check(d % 2 == 0, _OP, lambda: f"the head dim must be even to rotate channel pairs, got d = {d}")
    check(freqs.dim() in (3, 4) and tuple(freqs.shape[-3:]) == (N, d // 2, 2), _OP,
          lambda: f"freqs must be (N, d/2, 2) = ({N}, {d // 2}, 2) or (B, N, d/2, 2) for x of shape {shape_str(x)}, "
          f"got {shape_str(freqs)}")
    check(freqs.dim() == 3 or freqs.shape[0] in (1, B), _OP,
          lambda: f"a per-sample table must have batch {B} (or 1), got {shape_str(freqs)}")


def _cos_sin(freqs: Tensor, acc: torch.dtype):
    """(…, N, d/2, 2) -> cos, sin shaped (B or 1, N, 1, d/2) to broadcast over heads."""
    f = freqs.to(acc)
    if f.dim() == 3:
        f = f.unsqueeze(0)
    return f[..., 0].unsqueeze(2), f[..., 1].unsqueeze(2)


def _forward_math(x: Tensor, freqs: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    acc = compute_dtype(x)
    xf = x.to(acc)
    cos, sin = _cos_sin(freqs, acc)
    if inverse:
        sin = -sin
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:
        a, b = xf.chunk(2, dim=-1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = torch.stack([ra, rb], dim=-1).flatten(-2) if interleaved else torch.cat([ra, rb], dim=-1)
    return out.to(x.dtype)


def rope_ref(x: Tensor, freqs: Tensor, interleaved: bool = True, inverse: bool = False) -> Tensor:
    """Reference RoPE: rotate channel pairs of x (B, N, H, d) by the angles in ``freqs``.

    ``inverse=True`` rotates by −θ (the backward of the forward rotation, and its inverse).
    The table is treated as data: ``torch.ops.fastdit.rope`` gives it no gradient.
    """
    _check_inputs(x, freqs)
    return _forward_math(x, freqs, interleaved, inverse)


def _kernel_takes(x: Tensor, freqs: Tensor) -> bool:
    return kernel_can_run(x) and freqs.dtype == torch.float32


def _forward_impl(x: Tensor, freqs: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """The kernel where it can run, the reference math elsewhere; wrapped as the library op (torch.compile,
    opcheck) and as an autograd.Function (eager calls): see fastdit.ops.adaln."""
    if _kernel_takes(x, freqs):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_fwd
        return qk_norm_rope_fwd(x, freqs=freqs, interleaved=interleaved, inverse=inverse)[0]
    return owned_outputs((_forward_math(x, freqs, interleaved, inverse),), (x, freqs))[0]


def _forward_fake(x, freqs, interleaved, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_rope_op = library_op("rope", _forward_impl, _forward_fake)


def _setup_context(ctx, inputs, output):
    _, freqs, interleaved, inverse = inputs
    ctx.save_for_backward(freqs)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _backward(ctx, dy):
    (freqs,) = ctx.saved_tensors
    # A rotation is orthogonal: its backward is the rotation by the opposite angle.
    return torch.ops.fastdit.rope(dy, freqs, ctx.interleaved, not ctx.inverse), None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


class _RopeFunction(torch.autograd.Function):
    """Eager fast path (see fastdit.ops.adaln._AdaLNFunction); the table gets no gradient."""

    @staticmethod
    def forward(ctx, x, freqs, interleaved, inverse):
        ctx.save_for_backward(freqs)
        ctx.interleaved, ctx.inverse = interleaved, inverse
        return _forward_impl(x, freqs, interleaved, inverse)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _forward_impl(dy.contiguous(), freqs, ctx.interleaved, not ctx.inverse), None, None, None


def triton_unsupported_reason(x: Tensor, freqs: Tensor) -> Optional[str]:
    return join_reasons(
        triton_device_reason(x), triton_dtype_reason(x=x),
        f"freqs has dtype {freqs.dtype}; the kernel reads float32 tables (as rope_freqs* make them)"
        if freqs.dtype != torch.float32 else None)


def rope(x: Tensor, freqs: Tensor, interleaved: bool = True, inverse: bool = False, *,
         backend: Optional[str] = None) -> Tensor:
    """Rotate channel pairs of x (B, N, H, d) by ``freqs`` (N, d/2, 2) or (B, N, d/2, 2)."""
    _check_inputs(x, freqs)
    if use_triton(_OP, backend, lambda: triton_unsupported_reason(x, freqs), KERNEL_READY and x.is_cuda,
                  lambda: (x.numel(), needs_grad(x))):
        if torch.compiler.is_compiling():
            return torch.ops.fastdit.rope(x, freqs, interleaved, inverse)
        if needs_grad(x):
            return _RopeFunction.apply(x, freqs, interleaved, inverse)
        return _forward_impl(x, freqs, interleaved, inverse)
    return _forward_math(x, freqs, interleaved, inverse)


@torch.library.custom_op("fastdit::rope_", mutates_args=("x",))
def _rope_inplace_op(x: Tensor, freqs: Tensor, interleaved: bool, inverse: bool) -> None:
    if _kernel_takes(x, freqs):
        from fastdit.kernels.qk_norm_rope import qk_norm_rope_fwd
        qk_norm_rope_fwd(x, freqs=freqs, interleaved=interleaved, inverse=inverse, inplace=True)
    else:
        x.copy_(_forward_math(x, freqs, interleaved, inverse))


@_rope_inplace_op.register_fake
def _(x, freqs, interleaved, inverse):
    return None


def rope_(x: Tensor, freqs: Tensor, interleaved: bool = True, inverse: bool = False, *,
          backend: Optional[str] = None) -> Tensor:
    """In-place RoPE for inference: rotates x (B, N, H, d) where it lies and returns it. Not
    differentiable (use :func:`rope` in training)."""
    _check_inputs(x, freqs)
    if torch.is_grad_enabled() and x.requires_grad:
        fail("rope_", "x requires grad: in-place RoPE is for inference; use fastdit.ops.rope in training")
    if use_triton("rope_", backend, lambda: triton_unsupported_reason(x, freqs), KERNEL_READY and x.is_cuda):
        torch.ops.fastdit.rope_(x, freqs, interleaved, inverse)
    else:
        x.copy_(_forward_math(x, freqs, interleaved, inverse))
    return x

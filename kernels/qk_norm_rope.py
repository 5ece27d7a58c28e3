"""Per-head RMSNorm (QK-norm) and rotary embedding of q and k, fused, in one launch.

For each token and head of q (and k): optionally ``x = x * rsqrt(mean(x²) + eps) * weight``, then
optionally rotate channel pairs by the token's angles (RoPE). Either part can be off, so the same
kernel serves ``rope`` (q and/or k), ``rms_norm`` and the fused ``qk_norm_rope`` that SD3.5/Flux use
before attention. Backward: un-rotate (rotation by −θ), then the RMSNorm backward; the weight
gradient is a sum over tokens and heads, accumulated in fp32 per program and then summed in a fixed
order (deterministic).

Layout: q, k (B, N, H, d) with any strides (typically views of a fused QKV projection); the RoPE
table is (N, d/2, 2) or (B, N, d/2, 2) float32 ``[cos, sin]`` pairs; channel pairs interleaved
``(2i, 2i+1)`` or half-split ``(i, i + d/2)``. Outputs are contiguous (or the inputs, in place).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils
from fastdit.kernels._utils import to_dtype_rtne


@triton.jit
def _load_pairs(ptr, row_offsets, s_d, HALF, mask, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Load channel pairs (a, b) of rows [R, d] -> two [R, BLOCK_HALF] fp32 tiles.

    Interleaved rows are read whole (contiguous, wide loads) and split in registers."""
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_HALF)
        full_mask = mask & (c < 2 * HALF)[None, :]
        x = tl.load(ptr + row_offsets[:, None] + c.to(tl.int64)[None, :] * s_d, mask=full_mask, other=0.0)
        x = tl.reshape(x.to(tl.float32), [x.shape[0], BLOCK_HALF, 2])
        a, b = tl.split(x)
    else:
        pair_mask = mask & (i < HALF)[None, :]
        offs = row_offsets[:, None] + i.to(tl.int64)[None, :] * s_d
        a = tl.load(ptr + offs, mask=pair_mask, other=0.0).to(tl.float32)
        b = tl.load(ptr + offs + HALF * s_d, mask=pair_mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_pairs(ptr, row_offsets, s_d, HALF, mask, a, b, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.reshape(tl.join(a, b), [a.shape[0], 2 * BLOCK_HALF])
        tl.store(ptr + row_offsets[:, None] + c.to(tl.int64)[None, :] * s_d,
                 to_dtype_rtne(x, ptr.dtype.element_ty), mask=mask & (c < 2 * HALF)[None, :])
    else:
        i = tl.arange(0, BLOCK_HALF)
        offs = row_offsets[:, None] + i.to(tl.int64)[None, :] * s_d
        pair_mask = mask & (i < HALF)[None, :]
        tl.store(ptr + offs, to_dtype_rtne(a, ptr.dtype.element_ty), mask=pair_mask)
        tl.store(ptr + offs + HALF * s_d, to_dtype_rtne(b, ptr.dtype.element_ty), mask=pair_mask)


@triton.jit
def _cos_sin(FREQS, b, n, s_fb, s_fn, HALF, BLOCK_HALF: tl.constexpr):
    """The token's table row (HALF pairs of [cos, sin], contiguous) -> cos, sin as [1, BLOCK_HALF]."""
    c = tl.arange(0, 2 * BLOCK_HALF)
    t = tl.load(FREQS + b * s_fb + n * s_fn + c, mask=c < 2 * HALF, other=0.0)
    cos, sin = tl.split(tl.reshape(t, [BLOCK_HALF, 2]))
    return cos[None, :], sin[None, :]


@triton.jit
def _fwd_one(X, OUT, W, RSTD, row, b, n, H, HALF, eps, cos, sin,
             s_xb, s_xn, s_xh, s_xd, s_ob, s_on, s_oh, s_od,
             HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    h_ok = (h < H)[:, None]
    h = h.to(tl.int64)
    a, bb = _load_pairs(X, b * s_xb + n * s_xn + h * s_xh, s_xd, HALF, h_ok, INTERLEAVED, BLOCK_HALF)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(bb * bb, axis=1)) / (2 * HALF) + eps)
        tl.store(RSTD + row * H + h, rstd, mask=h < H)
        wa, wb = _load_pairs(W, tl.zeros([1], dtype=tl.int64), 1, HALF, tl.full([1, 1], 1, tl.int1),
                             INTERLEAVED, BLOCK_HALF)
        a = a * rstd[:, None] * wa
        bb = bb * rstd[:, None] * wb
    if HAS_ROPE:
        a, bb = a * cos - bb * sin, a * sin + bb * cos
    _store_pairs(OUT, b * s_ob + n * s_on + h * s_oh, s_od, HALF, h_ok, a, bb, INTERLEAVED, BLOCK_HALF)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QO, KO, QW, KW, FREQS, QRSTD, KRSTD,
    N, H, HALF, eps,
    s_qb, s_qn, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd,
    s_ob, s_on, s_oh, s_od, s_pb, s_pn, s_ph, s_pd, s_fb, s_fn,
    HAS_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program per token: all heads of q (and k)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row - b * N
    cos = None
    sin = None
    if HAS_ROPE:
        cos, sin = _cos_sin(FREQS, b, n, s_fb, s_fn, HALF, BLOCK_HALF)
        if INVERSE:
            sin = -sin
    _fwd_one(Q, QO, QW, QRSTD, row, b, n, H, HALF, eps, cos, sin, s_qb, s_qn, s_qh, s_qd, s_ob, s_on, s_oh, s_od,
             HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    if HAS_K:
        _fwd_one(K, KO, KW, KRSTD, row, b, n, H, HALF, eps, cos, sin, s_kb, s_kn, s_kh, s_kd,
                 s_pb, s_pn, s_ph, s_pd, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_H, BLOCK_HALF)


@triton.jit
def _bwd_one(DO, X, DX, W, RSTD, row, b, n, H, HALF, cos, sin, acc_a, acc_b,
             s_ob, s_on, s_oh, s_od, s_xb, s_xn, s_xh, s_xd,
             HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    h_ok = (h < H)[:, None]
    h = h.to(tl.int64)
    ga, gb = _load_pairs(DO, b * s_ob + n * s_on + h * s_oh, s_od, HALF, h_ok, INTERLEAVED, BLOCK_HALF)
    if HAS_ROPE:  # the transpose of a rotation is the rotation by the opposite angle
        ga, gb = ga * cos + gb * sin, gb * cos - ga * sin
    if HAS_NORM:
        xa, xb = _load_pairs(X, b * s_xb + n * s_xn + h * s_xh, s_xd, HALF, h_ok, INTERLEAVED, BLOCK_HALF)
        rstd = tl.load(RSTD + row * H + h, mask=h < H, other=0.0)[:, None]
        xa = xa * rstd
        xb = xb * rstd
        wa, wb = _load_pairs(W, tl.zeros([1], dtype=tl.int64), 1, HALF, tl.full([1, 1], 1, tl.int1),
                             INTERLEAVED, BLOCK_HALF)
        acc_a += tl.sum(ga * xa, axis=0)
        acc_b += tl.sum(gb * xb, axis=0)
        ga = ga * wa
        gb = gb * wb
        c = (tl.sum(ga * xa, axis=1) + tl.sum(gb * xb, axis=1)) / (2 * HALF)
        ga = rstd * (ga - xa * c[:, None])
        gb = rstd * (gb - xb * c[:, None])
    # dx is contiguous (B, N, H, d)
    _store_pairs(DX, row * H * 2 * HALF + h * 2 * HALF, 1, HALF, h_ok, ga, gb, INTERLEAVED, BLOCK_HALF)
    return acc_a, acc_b


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO, DKO, Q, K, DQ, DK, QW, KW, FREQS, QRSTD, KRSTD, DW,
    M, N, H, HALF, rows_per_program,
    s_ob, s_on, s_oh, s_od, s_pb, s_pn, s_ph, s_pd,
    s_qb, s_qn, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_fb, s_fn,
    HAS_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Program p handles tokens [p*rows_per_program, …); weight-gradient partials go to
    DW[t, p, :] (t = 0 for q, 1 for k), an fp32 (2, P, d) buffer."""
    pid = tl.program_id(0)
    qa = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    qb = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    ka = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    kb = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    for r in range(row_begin, row_end):
        row = tl.cast(r, tl.int64)
        b = row // N
        n = row - b * N
        cos = None
        sin = None
        if HAS_ROPE:
            cos, sin = _cos_sin(FREQS, b, n, s_fb, s_fn, HALF, BLOCK_HALF)
            if INVERSE:
                sin = -sin
        qa, qb = _bwd_one(DQO, Q, DQ, QW, QRSTD, row, b, n, H, HALF, cos, sin, qa, qb,
                          s_ob, s_on, s_oh, s_od, s_qb, s_qn, s_qh, s_qd,
                          HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        if HAS_K:
            ka, kb = _bwd_one(DKO, K, DK, KW, KRSTD, row, b, n, H, HALF, cos, sin, ka, kb,
                              s_pb, s_pn, s_ph, s_pd, s_kb, s_kn, s_kh, s_kd,
                              HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    if HAS_NORM:
        base = pid.to(tl.int64) * 2 * HALF
        ones = tl.full([1, 1], 1, tl.int1)
        _store_pairs(DW, tl.zeros([1], dtype=tl.int64) + base, 1, HALF, ones, qa[None, :], qb[None, :],
                     INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            plane = tl.num_programs(0).to(tl.int64) * 2 * HALF
            _store_pairs(DW, tl.zeros([1], dtype=tl.int64) + plane + base, 1, HALF, ones, ka[None, :],
                         kb[None, :], INTERLEAVED, BLOCK_HALF)


# ------------------------------------------------------------------------------------------ launchers

def _table_strides(freqs: Optional[torch.Tensor]):
    if freqs is None:
        return 0, 0
    if freqs.dim() == 3:
        return 0, freqs.stride(0)
    return (freqs.stride(0) if freqs.shape[0] > 1 else 0), freqs.stride(1)


def _config(H: int, d: int, num_warps: Optional[int] = None):
    block_h, block_half = _utils.next_pow2(H), _utils.next_pow2(d // 2)
    return block_h, block_half, num_warps or _utils.warps_for(2 * block_h * block_half, lo=1, hi=8)


def qk_norm_rope_fwd(q: torch.Tensor, k: Optional[torch.Tensor] = None, q_weight: Optional[torch.Tensor] = None,
                     k_weight: Optional[torch.Tensor] = None, freqs: Optional[torch.Tensor] = None,
                     eps: float = 1e-6, interleaved: bool = True, inverse: bool = False, inplace: bool = False,
                     num_warps: Optional[int] = None):
    """Returns (q_out, k_out, q_rstd, k_rstd): k_out is None without k; the rstd are fp32 (B, N, H)
    (None without the norm). With ``inplace=True`` the outputs are q and k themselves."""
    B, N, H, d = q.shape
    has_norm = q_weight is not None
    if freqs is not None:
        freqs = freqs if freqs.stride(-1) == 1 and freqs.stride(-2) == 2 else freqs.contiguous()
    q_out = q if inplace else _utils.new_empty((B, N, H, d), q.dtype, q.device)
    k_out = None if k is None else (k if inplace else _utils.new_empty((B, N, H, d), k.dtype, k.device))
    q_rstd = _utils.new_empty((B, N, H), torch.float32, q.device) if has_norm else None
    k_rstd = _utils.new_empty((B, N, H), torch.float32, q.device) if has_norm and k is not None else None
    block_h, block_half, warps = _config(H, d, num_warps)
    kk, ko = (k, k_out) if k is not None else (q, q_out)
    if B * N > 0 and H > 0:
        _qk_norm_rope_fwd_kernel[(B * N,)](
            q, kk, q_out, ko, q_weight if has_norm else q, k_weight if (has_norm and k is not None) else q,
            freqs if freqs is not None else q, q_rstd if has_norm else q, k_rstd if k_rstd is not None else q,
            N, H, d // 2, eps, *q.stride(), *kk.stride(), *q_out.stride(), *ko.stride(), *_table_strides(freqs),
            HAS_K=k is not None, HAS_NORM=has_norm, HAS_ROPE=freqs is not None, INTERLEAVED=interleaved,
            INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=warps)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_bwd(dq_out: torch.Tensor, dk_out: Optional[torch.Tensor], q: torch.Tensor,
                     k: Optional[torch.Tensor], q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                     freqs: Optional[torch.Tensor], q_rstd: Optional[torch.Tensor], k_rstd: Optional[torch.Tensor],
                     interleaved: bool = True, inverse: bool = False, programs_per_sm: int = 4,
                     num_warps: Optional[int] = None):
    """Returns (dq, dk, dq_weight, dk_weight); entries are None where the input was absent."""
    B, N, H, d = q.shape
    has_norm, has_k = q_weight is not None, k is not None
    if not has_norm:  # no reduction: the backward of a rotation is a rotation (one program per token)
        dq, dk, _, _ = qk_norm_rope_fwd(dq_out, dk_out, freqs=freqs, interleaved=interleaved, inverse=not inverse,
                                        num_warps=num_warps)
        return dq, dk, None, None
    if freqs is not None:
        freqs = freqs if freqs.stride(-1) == 1 and freqs.stride(-2) == 2 else freqs.contiguous()
    M = B * N
    programs = max(1, min(M, programs_per_sm * _utils.processor_count(q.device)))
    rows_per_program = triton.cdiv(M, programs) if M else 1
    programs = triton.cdiv(M, rows_per_program) if M else 0
    dq = _utils.new_empty((B, N, H, d), q.dtype, q.device)
    dk = _utils.new_empty((B, N, H, d), k.dtype, k.device) if has_k else None
    partials = _utils.new_empty((2 if has_k else 1, 1, programs, d), torch.float32, q.device)
    block_h, block_half, warps = _config(H, d, num_warps)
    kk, dko, dkk = (k, dk_out, dk) if has_k else (q, dq_out, dq)
    if programs > 0 and H > 0:
        _qk_norm_rope_bwd_kernel[(programs,)](
            dq_out, dko, q, kk, dq, dkk, q_weight, k_weight if has_k else q_weight,
            freqs if freqs is not None else q, q_rstd, k_rstd if has_k else q_rstd, partials,
            M, N, H, d // 2, rows_per_program, *dq_out.stride(), *dko.stride(), *q.stride(), *kk.stride(),
            *_table_strides(freqs), HAS_K=has_k, HAS_NORM=True, HAS_ROPE=freqs is not None,
            INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=warps)
    dweights = [_utils.new_empty((d,), q_weight.dtype, q.device)]
    if has_k:
        dweights.append(_utils.new_empty((d,), k_weight.dtype, q.device))
    _utils.sum_chunks(partials, dweights)
    return dq, dk, dweights[0], (dweights[1] if has_k else None)

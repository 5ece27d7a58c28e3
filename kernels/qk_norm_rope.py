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
def _load_raw(ptr, row_offsets, s_d, HALF, mask, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Raw loads of rows [R, d] of channel pairs (issued a step before use). Interleaved rows are read
    whole (contiguous, wide loads; the second value is the same tile); half-split as two halves.
    (One exit only: Triton 3.6 checks return types across constexpr branches.)"""
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_HALF)
        a = tl.load(ptr + row_offsets[:, None] + c.to(tl.int64)[None, :] * s_d, mask=mask & (c < 2 * HALF)[None, :],
                    other=0.0)
        b = a
    else:
        i = tl.arange(0, BLOCK_HALF)
        offs = row_offsets[:, None] + i.to(tl.int64)[None, :] * s_d
        pair_mask = mask & (i < HALF)[None, :]
        a = tl.load(ptr + offs, mask=pair_mask, other=0.0)
        b = tl.load(ptr + offs + HALF * s_d, mask=pair_mask, other=0.0)
    return a, b


@triton.jit
def _pairs(raw_a, raw_b, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Raw loads -> the channel pairs (a, b) as fp32 [R, BLOCK_HALF] tiles."""
    if INTERLEAVED:
        a, b = tl.split(tl.reshape(raw_a.to(tl.float32), [raw_a.shape[0], BLOCK_HALF, 2]))
    else:
        a = raw_a.to(tl.float32)
        b = raw_b.to(tl.float32)
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
def _weight_pairs(W, HALF, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The norm weight (d,) as pairs [1, BLOCK_HALF] (loaded once per program)."""
    ra, rb = _load_raw(W, tl.zeros([1], dtype=tl.int64), 1, HALF, tl.full([1, 1], 1, tl.int1), INTERLEAVED,
                       BLOCK_HALF)
    return _pairs(ra, rb, INTERLEAVED, BLOCK_HALF)


@triton.jit
def _load_table(FREQS, b, n, s_fb, s_fn, HALF, ok, BLOCK_HALF: tl.constexpr):
    """The token's table row: HALF contiguous [cos, sin] pairs, raw."""
    c = tl.arange(0, 2 * BLOCK_HALF)
    return tl.load(FREQS + b * s_fb + n * s_fn + c, mask=(c < 2 * HALF) & ok, other=0.0)


@triton.jit
def _cos_sin(table_row, INVERSE: tl.constexpr, BLOCK_HALF: tl.constexpr):
    cos, sin = tl.split(tl.reshape(table_row, [BLOCK_HALF, 2]))
    if INVERSE:
        sin = -sin
    return cos[None, :], sin[None, :]


@triton.jit
def _fwd_token(raw_a, raw_b, OUT, RSTD, out_offsets, rstd_offsets, s_od, HALF, mask, h_ok, eps, wa, wb, cos, sin,
               HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    a, b = _pairs(raw_a, raw_b, INTERLEAVED, BLOCK_HALF)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
        tl.store(RSTD + rstd_offsets, rstd, mask=h_ok)
        a = a * rstd[:, None] * wa
        b = b * rstd[:, None] * wb
    if HAS_ROPE:
        a, b = a * cos - b * sin, a * sin + b * cos
    _store_pairs(OUT, out_offsets, s_od, HALF, mask, a, b, INTERLEAVED, BLOCK_HALF)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QO, KO, QW, KW, FREQS, QRSTD, KRSTD,
    M, N, H, HALF, eps,
    s_qb, s_qn, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd,
    s_ob, s_on, s_oh, s_od, s_pb, s_pn, s_ph, s_pd, s_fb, s_fn,
    HAS_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
):
    """Program p handles TOKENS consecutive tokens (all heads of q and k). (One token per program measured
    fastest on an H100; looping with prefetch lost to register pressure.)"""
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    h = h.to(tl.int64)
    wqa = None
    wqb = None
    wka = None
    wkb = None
    if HAS_NORM:
        wqa, wqb = _weight_pairs(QW, HALF, INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            wka, wkb = _weight_pairs(KW, HALF, INTERLEAVED, BLOCK_HALF)
    for t in tl.static_range(TOKENS):
        # the token index is a 1-element vector rather than a scalar: Triton's CPU interpreter mis-types
        # `tile & scalar_mask`, and a [1] vector broadcasts the same way in compiled code
        row = tl.program_id(0).to(tl.int64) * TOKENS + t + tl.zeros([1], dtype=tl.int64)
        ok = row < M
        b = row // N
        n = row - b * N
        mask = h_ok[:, None] & ok[None, :]
        cos = None
        sin = None
        if HAS_ROPE:
            cos, sin = _cos_sin(_load_table(FREQS, b, n, s_fb, s_fn, HALF, ok, BLOCK_HALF), INVERSE, BLOCK_HALF)
        qa, qb = _load_raw(Q, b * s_qb + n * s_qn + h * s_qh, s_qd, HALF, mask, INTERLEAVED, BLOCK_HALF)
        _fwd_token(qa, qb, QO, QRSTD, b * s_ob + n * s_on + h * s_oh, row * H + h, s_od, HALF, mask, h_ok & ok,
                   eps, wqa, wqb, cos, sin, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            ka, kb = _load_raw(K, b * s_kb + n * s_kn + h * s_kh, s_kd, HALF, mask, INTERLEAVED, BLOCK_HALF)
            _fwd_token(ka, kb, KO, KRSTD, b * s_pb + n * s_pn + h * s_ph, row * H + h, s_pd, HALF, mask,
                       h_ok & ok, eps, wka, wkb, cos, sin, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF)


@triton.jit
def _bwd_token(raw_ga, raw_gb, raw_xa, raw_xb, rstd, DX, dx_offsets, HALF, mask, wa, wb, cos, sin, acc_a, acc_b,
               HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    ga, gb = _pairs(raw_ga, raw_gb, INTERLEAVED, BLOCK_HALF)
    if HAS_ROPE:  # the transpose of a rotation is the rotation by the opposite angle
        ga, gb = ga * cos + gb * sin, gb * cos - ga * sin
    if HAS_NORM:
        xa, xb = _pairs(raw_xa, raw_xb, INTERLEAVED, BLOCK_HALF)
        xa = xa * rstd[:, None]
        xb = xb * rstd[:, None]
        acc_a += tl.sum(ga * xa, axis=0)
        acc_b += tl.sum(gb * xb, axis=0)
        ga = ga * wa
        gb = gb * wb
        c = (tl.sum(ga * xa, axis=1) + tl.sum(gb * xb, axis=1)) / (2 * HALF)
        ga = rstd[:, None] * (ga - xa * c[:, None])
        gb = rstd[:, None] * (gb - xb * c[:, None])
    _store_pairs(DX, dx_offsets, 1, HALF, mask, ga, gb, INTERLEAVED, BLOCK_HALF)
    return acc_a, acc_b


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO, DKO, Q, K, DQ, DK, QW, KW, FREQS, QRSTD, KRSTD, DW,
    M, N, H, HALF,
    s_ob, s_on, s_oh, s_od, s_pb, s_pn, s_ph, s_pd,
    s_qb, s_qn, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_fb, s_fn,
    HAS_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
):
    """Program p handles TOKENS consecutive tokens; its weight-gradient partials go to DW[t, 0, p, :]
    (t = 0 for q, 1 for k), an fp32 (2, 1, P, d) buffer summed afterwards in a fixed order."""
    pid = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    h = h.to(tl.int64)
    qa_acc = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    qb_acc = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    ka_acc = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    kb_acc = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    wqa = None
    wqb = None
    wka = None
    wkb = None
    if HAS_NORM:
        wqa, wqb = _weight_pairs(QW, HALF, INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            wka, wkb = _weight_pairs(KW, HALF, INTERLEAVED, BLOCK_HALF)
    for t in tl.static_range(TOKENS):
        row = pid.to(tl.int64) * TOKENS + t + tl.zeros([1], dtype=tl.int64)  # [1]: see the forward kernel
        ok = row < M
        b = row // N
        n = row - b * N
        mask = h_ok[:, None] & ok[None, :]
        cos = None
        sin = None
        if HAS_ROPE:
            cos, sin = _cos_sin(_load_table(FREQS, b, n, s_fb, s_fn, HALF, ok, BLOCK_HALF), INVERSE, BLOCK_HALF)
        dx_offsets = row * H * 2 * HALF + h * 2 * HALF  # dq, dk are contiguous (B, N, H, d)
        ga, gb = _load_raw(DQO, b * s_ob + n * s_on + h * s_oh, s_od, HALF, mask, INTERLEAVED, BLOCK_HALF)
        xa = ga
        xb = gb
        rstd = tl.zeros([BLOCK_H], dtype=tl.float32)
        if HAS_NORM:
            xa, xb = _load_raw(Q, b * s_qb + n * s_qn + h * s_qh, s_qd, HALF, mask, INTERLEAVED, BLOCK_HALF)
            rstd = tl.load(QRSTD + row * H + h, mask=h_ok & ok, other=0.0)
        qa_acc, qb_acc = _bwd_token(ga, gb, xa, xb, rstd, DQ, dx_offsets, HALF, mask, wqa, wqb, cos, sin,
                                    qa_acc, qb_acc, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            ga, gb = _load_raw(DKO, b * s_pb + n * s_pn + h * s_ph, s_pd, HALF, mask, INTERLEAVED, BLOCK_HALF)
            xa = ga
            xb = gb
            if HAS_NORM:
                xa, xb = _load_raw(K, b * s_kb + n * s_kn + h * s_kh, s_kd, HALF, mask, INTERLEAVED, BLOCK_HALF)
                rstd = tl.load(KRSTD + row * H + h, mask=h_ok & ok, other=0.0)
            ka_acc, kb_acc = _bwd_token(ga, gb, xa, xb, rstd, DK, dx_offsets, HALF, mask, wka, wkb, cos, sin,
                                        ka_acc, kb_acc, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF)
    if HAS_NORM:
        base = tl.zeros([1], dtype=tl.int64) + pid.to(tl.int64) * 2 * HALF
        ones = tl.full([1, 1], 1, tl.int1)
        _store_pairs(DW, base, 1, HALF, ones, qa_acc[None, :], qb_acc[None, :], INTERLEAVED, BLOCK_HALF)
        if HAS_K:
            plane = tl.num_programs(0).to(tl.int64) * 2 * HALF
            _store_pairs(DW, base + plane, 1, HALF, ones, ka_acc[None, :], kb_acc[None, :], INTERLEAVED, BLOCK_HALF)


# ------------------------------------------------------------------------------------------ launchers

def _table_strides(freqs: Optional[torch.Tensor]):
    if freqs is None:
        return 0, 0
    if freqs.dim() == 3:
        return 0, freqs.stride(0)
    return (freqs.stride(0) if freqs.shape[0] > 1 else 0), freqs.stride(1)


def _config(H: int, d: int, num_warps: Optional[int] = None, backward: bool = False):
    """Defaults from benchmarks/tune_kernels.py on an H100 (2026-11-22): 2 warps for a DiT-XL token
    (16 heads × 72) and for every backward, 4 for a Flux/SD3 token (24 heads × 128) forward."""
    block_h, block_half = _utils.next_pow2(H), _utils.next_pow2(d // 2)
    if num_warps is None:
        num_warps = 2 if (backward or block_h * block_half < 2048) else 4
    return block_h, block_half, num_warps


def qk_norm_rope_fwd(q: torch.Tensor, k: Optional[torch.Tensor] = None, q_weight: Optional[torch.Tensor] = None,
                     k_weight: Optional[torch.Tensor] = None, freqs: Optional[torch.Tensor] = None,
                     eps: float = 1e-6, interleaved: bool = True, inverse: bool = False, inplace: bool = False,
                     num_warps: Optional[int] = None, tokens: int = 1):
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
    programs = _utils.cdiv(B * N, tokens)
    if programs > 0 and H > 0:
        _utils.launcher(_qk_norm_rope_fwd_kernel, q_out)[(programs,)](
            q, kk, q_out, ko, q_weight if has_norm else q, k_weight if (has_norm and k is not None) else q,
            freqs if freqs is not None else q, q_rstd if has_norm else q, k_rstd if k_rstd is not None else q,
            B * N, N, H, d // 2, eps, *q.stride(), *kk.stride(), *q_out.stride(), *ko.stride(),
            *_table_strides(freqs),
            HAS_K=k is not None, HAS_NORM=has_norm, HAS_ROPE=freqs is not None, INTERLEAVED=interleaved,
            INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half, TOKENS=tokens, num_warps=warps)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_bwd(dq_out: torch.Tensor, dk_out: Optional[torch.Tensor], q: torch.Tensor,
                     k: Optional[torch.Tensor], q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                     freqs: Optional[torch.Tensor], q_rstd: Optional[torch.Tensor], k_rstd: Optional[torch.Tensor],
                     interleaved: bool = True, inverse: bool = False, num_warps: Optional[int] = None,
                     tokens: int = 1):
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
    programs = _utils.cdiv(M, tokens)
    dq = _utils.new_empty((B, N, H, d), q.dtype, q.device)
    dk = _utils.new_empty((B, N, H, d), k.dtype, k.device) if has_k else None
    partials = _utils.new_empty((2 if has_k else 1, 1, programs, d), torch.float32, q.device)
    block_h, block_half, warps = _config(H, d, num_warps, backward=True)
    kk, dko, dkk = (k, dk_out, dk) if has_k else (q, dq_out, dq)
    if programs > 0 and H > 0:
        _utils.launcher(_qk_norm_rope_bwd_kernel, dq)[(programs,)](
            dq_out, dko, q, kk, dq, dkk, q_weight, k_weight if has_k else q_weight,
            freqs if freqs is not None else q, q_rstd, k_rstd if has_k else q_rstd, partials,
            M, N, H, d // 2, *dq_out.stride(), *dko.stride(), *q.stride(), *kk.stride(),
            *_table_strides(freqs), HAS_K=has_k, HAS_NORM=True, HAS_ROPE=freqs is not None,
            INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half, TOKENS=tokens,
            num_warps=warps)
    dweights = [_utils.new_empty((d,), q_weight.dtype, q.device)]
    if has_k:
        dweights.append(_utils.new_empty((d,), k_weight.dtype, q.device))
    _utils.sum_chunks(partials, dweights)
    return dq, dk, dweights[0], (dweights[1] if has_k else None)

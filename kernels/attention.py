"""Joint image-text flash attention with fused QK RMSNorm and RoPE, forward and backward.

One softmax attention over the concatenation [text, image] (SD3/Flux MMDiT; no text = DiT self-attention),
read straight from each stream's own q/k/v tensors — no concatenation copy — and written to each
stream's own output. Tiled with an online softmax (O(N) memory); the log-sum-exp is saved for the
backward, which recomputes the probabilities.

Fused on load (optional, per stream): QK RMSNorm ``x * rsqrt(mean(x²) + eps) * w`` and RoPE (rotation of
channel pairs by a [cos, sin] table, interleaved or half-split pairs). q and k are held as two channel
tiles ``(a, b)``: with RoPE the pairs' two members — the even/odd channels (interleaved) or the two halves —
which is what the rotation needs; without it the widest power of two and the rest (72 = 64 + 8), which keeps
a head dim that is not a power of two aligned and unpadded (``_channel_layout``). QKᵀ = a_q·a_kᵀ + b_q·b_kᵀ
is the same dot product in another channel order. v, o and do are split the same way when d is not a power
of two (``_value_layout``).

Launch structure: one launch per query stream (forward; backward dq) and one per key/value stream
(backward dk, dv); each program loops over the text keys, then the image keys (or queries). The backward
is deterministic: dq and (dk, dv) come from separate kernels, each accumulating in registers; the norm
weight gradients are per-program fp32 partials summed in a fixed order by the launcher.

Shapes: q, k, v (B, N, H, d) of each stream, any strides (``(B, H, N, d)`` views too); key mask of the
text stream int8 (B, N_txt) (1 = real token); RoPE tables (N, d/2, 2) or (B, N, d/2, 2) float32 with
contiguous pairs; lse (B, H, N_txt + N_img) float32, natural log, text positions first.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils

LOG2E = 1.4426950408889634


@triton.jit
def _head(ptr, b, h, s_b, s_h, ALIGN: tl.constexpr):
    """``ptr`` moved to head (b, h). ALIGN: the launcher's guarantee that the offset is a multiple of ALIGN
    elements. Triton infers alignment only from integer arguments divisible by 16, and the head stride of a
    head dim such as 72 is not: without the hint no row is known to be 16-byte aligned, so no load is copied
    asynchronously and the software pipeline is lost."""
    offset = b * s_b + h * s_h
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return ptr + offset


@triton.jit
def _load_pairs(ptr, rows, row_ok, s_n, s_d, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
                INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Rows of q or k as the two channel tiles (a, b) [R, BLOCK_A], [R, BLOCK_B], in the input dtype (a
    tile that goes straight into tl.dot must not pass through float32: the software pipeliner only streams
    loads that feed a dot directly). Interleaved rows are loaded whole (contiguous, vectorised) and split
    into even and odd channels; otherwise a = channels [0, WA) and b = [OFF_B, OFF_B + WB), contiguous.
    The layout is compile-time (see ``_channel_layout``) so that the compiler knows each tile's alignment:
    a misaligned or runtime-masked tile cannot be copied asynchronously and is not pipelined. In-head
    offsets are 32-bit (the launcher checks they fit)."""
    base = ptr + rows[:, None] * s_n
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_A)
        x = tl.load(base + c[None, :] * s_d, mask=row_ok[:, None] & (c < 2 * WA)[None, :], other=0.0)
        a, b = tl.split(tl.reshape(x, [x.shape[0], BLOCK_A, 2]))
    else:
        i = tl.arange(0, BLOCK_A)
        j = tl.arange(0, BLOCK_B)
        a = tl.load(base + i[None, :] * s_d, mask=row_ok[:, None] & (i < WA)[None, :], other=0.0)
        b = tl.load(base + (j + OFF_B)[None, :] * s_d, mask=row_ok[:, None] & (j < WB)[None, :], other=0.0)
    return a, b


@triton.jit
def _store_pairs(ptr, rows, row_ok, s_n, s_d, a, b, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    base = ptr + rows[:, None] * s_n
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_A)
        x = tl.reshape(tl.join(a, b), [a.shape[0], 2 * BLOCK_A])
        tl.store(base + c[None, :] * s_d, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (c < 2 * WA)[None, :])
    else:
        i = tl.arange(0, BLOCK_A)
        j = tl.arange(0, BLOCK_B)
        tl.store(base + i[None, :] * s_d, a.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (i < WA)[None, :])
        tl.store(base + (j + OFF_B)[None, :] * s_d, b.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (j < WB)[None, :])


@triton.jit
def _weight_pairs(W, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, INTERLEAVED: tl.constexpr,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The norm weight in the layout of the (a, b) tiles: [1, BLOCK_A], [1, BLOCK_B] float32."""
    i = tl.arange(0, BLOCK_A)
    j = tl.arange(0, BLOCK_B)
    if INTERLEAVED:
        off_a = 2 * i
        off_b = 2 * j + 1
    else:
        off_a = i
        off_b = j + OFF_B
    wa = tl.load(W + off_a, mask=i < WA, other=0.0).to(tl.float32)
    wb = tl.load(W + off_b, mask=j < WB, other=0.0).to(tl.float32)
    return wa[None, :], wb[None, :]


@triton.jit
def _cos_sin(FREQS, rows, row_ok, s_fn, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    i = tl.arange(0, BLOCK_HALF)
    mask = row_ok[:, None] & (i < HALF)[None, :]
    at = FREQS + rows[:, None] * s_fn + 2 * i[None, :]
    return tl.load(at, mask=mask, other=1.0), tl.load(at + 1, mask=mask, other=0.0)


@triton.jit
def _norm_rope(a, b, W, FREQS, rows, row_ok, s_fn, eps,
               HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr, OFF_B: tl.constexpr,
               WA: tl.constexpr, WB: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr,
               BLOCK_B: tl.constexpr):
    """(a, b) -> RoPE(RMSNorm(x) * w) in float32; unchanged (input dtype) when there is neither. With RoPE
    the tiles are channel pairs (WA = WB = D/2, BLOCK_A = BLOCK_B)."""
    if HAS_NORM or HAS_ROPE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / D + eps)
        wa, wb = _weight_pairs(W, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
        a = a * rstd[:, None] * wa
        b = b * rstd[:, None] * wb
    if HAS_ROPE:
        cos, sin = _cos_sin(FREQS, rows, row_ok, s_fn, WA, BLOCK_A)
        a, b = a * cos - b * sin, a * sin + b * cos
    return a, b


@triton.jit
def _norm_rope_backward(ga, gb, xa, xb, W, FREQS, rows, row_ok, s_fn, eps,
                        HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr, OFF_B: tl.constexpr,
                        WA: tl.constexpr, WB: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_B: tl.constexpr):
    """Gradient (ga, gb) w.r.t. RoPE(RMSNorm(x) * w) -> gradient w.r.t. x, and the per-channel sums over
    rows of the weight gradient in the tiles' layout, [BLOCK_A], [BLOCK_B] (zeros without the norm)."""
    if HAS_ROPE:  # rotation by -θ
        cos, sin = _cos_sin(FREQS, rows, row_ok, s_fn, WA, BLOCK_A)
        ga, gb = ga * cos + gb * sin, gb * cos - ga * sin
    dwa = tl.zeros([BLOCK_A], dtype=tl.float32)
    dwb = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_NORM:
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D + eps)
        wa, wb = _weight_pairs(W, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
        ha = xa * rstd[:, None]
        hb = xb * rstd[:, None]
        dwa = tl.sum(ga * ha, axis=0)
        dwb = tl.sum(gb * hb, axis=0)
        gwa = ga * wa
        gwb = gb * wb
        c = (tl.sum(gwa * ha, axis=1) + tl.sum(gwb * hb, axis=1)) / D
        ga = rstd[:, None] * (gwa - ha * c[:, None])
        gb = rstd[:, None] * (gwb - hb * c[:, None])
    return ga, gb, dwa, dwb


@triton.jit
def _key_valid(MASK, b, s_mb, cols, col_ok, HAS_MASK: tl.constexpr):
    valid = col_ok
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * s_mb + cols, mask=col_ok, other=0) != 0)
    return valid


@triton.jit
def _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps,
               HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, PREC: tl.constexpr,
               D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
               INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """One block of keys against the program's queries: the prepared key pairs (in the query dtype), the raw
    scores q·kᵀ [BLOCK_M, BLOCK_N] and which keys are real."""
    ka, kb = _load_pairs(K, cols, col_ok, s_kn, s_kd, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    ka, kb = _norm_rope(ka, kb, KW, KF, cols, col_ok, s_fn, eps, HAS_NORM, HAS_ROPE, D, OFF_B, WA, WB, INTERLEAVED,
                        BLOCK_A, BLOCK_B)
    ka = ka.to(qa.dtype)
    kb = kb.to(qb.dtype)
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC) + tl.dot(qb, tl.trans(kb), input_precision=PREC)
    return ka, kb, s, _key_valid(MASK, b, s_mb, cols, col_ok, HAS_MASK)


@triton.jit
def _load_rows(ptr, rows, row_ok, s_n, s_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of v, o or do as a [R, BLOCK_D] tile (input dtype)."""
    dcols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * s_n + dcols[None, :] * s_d, mask=row_ok[:, None] & (dcols < D)[None, :],
                   other=0.0)


@triton.jit
def _load_values(ptr, rows, row_ok, s_n, s_d, D: tl.constexpr, BLOCK_D: tl.constexpr, VA: tl.constexpr,
                 BLOCK_VB: tl.constexpr):
    """Rows of v, o or do as two tiles, channels [0, VA) [R, BLOCK_D] and [VA, D) [R, BLOCK_VB] (input
    dtype), so that a head dim such as 72 is multiplied 64 + 16 wide rather than padded to 128. VA = D:
    one tile, and the second is an unused placeholder."""
    a = _load_rows(ptr, rows, row_ok, s_n, s_d, VA, BLOCK_D)
    if VA < D:
        b = _load_rows(ptr + VA * s_d, rows, row_ok, s_n, s_d, D - VA, BLOCK_VB)
    else:
        b = tl.zeros([rows.shape[0], BLOCK_VB], dtype=a.dtype)
    return a, b


@triton.jit
def _store_values(ptr, rows, row_ok, s_n, s_d, a, b, D: tl.constexpr, BLOCK_D: tl.constexpr, VA: tl.constexpr,
                  BLOCK_VB: tl.constexpr):
    """Store the two tiles of ``_load_values``."""
    i = tl.arange(0, BLOCK_D)
    base = ptr + rows[:, None] * s_n
    tl.store(base + i[None, :] * s_d, a.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (i < VA)[None, :])
    if VA < D:
        j = tl.arange(0, BLOCK_VB)
        tl.store(base + (VA + j)[None, :] * s_d, b.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (j < D - VA)[None, :])


# ------------------------------------------------------------------------------------------ forward

@triton.jit
def _fwd_kv_stream(acc, acc_b, l_i, m_i, qa, qb, K, V, KW, KF, MASK, b, N_kv, s_kn, s_kd, s_vn, s_vd, s_fn, s_mb,
                   qk_scale, eps,
                   HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, VA: tl.constexpr, BLOCK_VB: tl.constexpr, PREC: tl.constexpr,
                   ALL_VALID: tl.constexpr,
                   D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """ALL_VALID: every key is real (no mask, N_kv a multiple of BLOCK_N). The scores then need no -inf
    select, and scaling folds into the exponent's argument (one FMA per score instead of a multiply, a
    select and a subtract): the softmax's elementwise work competes with the tensor cores for issue
    slots."""
    for start in range(0, N_kv, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N_kv
        _, _, s, valid = _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps,
                                    HAS_MASK, HAS_NORM, HAS_ROPE, PREC, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
        if ALL_VALID:
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        else:
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        va, vb = _load_values(V, cols, col_ok, s_vn, s_vd, D, BLOCK_D, VA, BLOCK_VB)
        p = p.to(va.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, va, input_precision=PREC)
        if VA < D:
            acc_b = acc_b * alpha[:, None] + tl.dot(p, vb, input_precision=PREC)
        m_i = m_new
    return acc, acc_b, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, QW, QF, OUT, LSE,
    K1, V1, K1W, K1F, MASK1, K2, V2, K2W, K2F,
    H, N_q, N1, N2, lse_offset, N_total, sm_scale, eps,
    s_qb, s_qh, s_qn, s_qd, s_qfb, s_qfn, s_ob, s_oh, s_on, s_od,
    s_k1b, s_k1h, s_k1n, s_k1d, s_v1b, s_v1h, s_v1n, s_v1d, s_k1fb, s_k1fn, s_m1b,
    s_k2b, s_k2h, s_k2n, s_k2d, s_v2b, s_v2h, s_v2n, s_v2d, s_k2fb, s_k2fn,
    Q_NORM: tl.constexpr, Q_ROPE: tl.constexpr, K1_NORM: tl.constexpr, K1_ROPE: tl.constexpr,
    HAS_MASK1: tl.constexpr, K2_NORM: tl.constexpr, K2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VA: tl.constexpr, BLOCK_VB: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
    D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr, ALIGN: tl.constexpr,
):
    """Program (m, b·H + h): BLOCK_M queries of one stream against stream 1's keys (the text, masked),
    then stream 2's (the image). ALL_VALID1/2: see ``_fwd_kv_stream``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_q
    qa, qb = _load_pairs(_head(Q, b, h, s_qb, s_qh, ALIGN), rows, row_ok, s_qn, s_qd, OFF_B, WA, WB, INTERLEAVED,
                         BLOCK_A, BLOCK_B)
    qa, qb = _norm_rope(qa, qb, QW, QF + b * s_qfb, rows, row_ok, s_qfn, eps, Q_NORM, Q_ROPE,
                        D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    qa = qa.to(Q.dtype.element_ty)
    qb = qb.to(Q.dtype.element_ty)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_VB], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block leaves it unchanged
    acc, acc_b, l_i, m_i = _fwd_kv_stream(
        acc, acc_b, l_i, m_i, qa, qb, _head(K1, b, h, s_k1b, s_k1h, ALIGN), _head(V1, b, h, s_v1b, s_v1h, ALIGN),
        K1W, K1F + b * s_k1fb, MASK1, b, N1, s_k1n, s_k1d, s_v1n, s_v1d, s_k1fn, s_m1b, qk_scale, eps,
        HAS_MASK1, K1_NORM, K1_ROPE, BLOCK_N, BLOCK_D, VA, BLOCK_VB, PREC, ALL_VALID1,
        D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    acc, acc_b, l_i, m_i = _fwd_kv_stream(
        acc, acc_b, l_i, m_i, qa, qb, _head(K2, b, h, s_k2b, s_k2h, ALIGN), _head(V2, b, h, s_v2b, s_v2h, ALIGN),
        K2W, K2F + b * s_k2fb, MASK1, b, N2, s_k2n, s_k2d, s_v2n, s_v2d, s_k2fn, s_m1b, qk_scale, eps,
        False, K2_NORM, K2_ROPE, BLOCK_N, BLOCK_D, VA, BLOCK_VB, PREC, ALL_VALID2,
        D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    _store_values(_head(OUT, b, h, s_ob, s_oh, ALIGN), rows, row_ok, s_on, s_od, acc / l_i[:, None],
                  acc_b / l_i[:, None], D, BLOCK_D, VA, BLOCK_VB)
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + bh.to(tl.int64) * N_total + lse_offset + rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------ backward

@triton.jit
def _dq_kv_stream(dqa, dqb, qa, qb, do, do_b, lse2, delta, K, V, KW, KF, MASK, b, N_kv, s_kn, s_kd, s_vn, s_vd,
                  s_fn, s_mb, qk_scale, eps, row_ok,
                  HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, VA: tl.constexpr, BLOCK_VB: tl.constexpr, PREC: tl.constexpr,
                  ALL_VALID: tl.constexpr,
                  D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
                  INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """ALL_VALID: every key and every query row of the program is real (see ``_fwd_kv_stream``)."""
    for start in range(0, N_kv, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N_kv
        ka, kb, s, valid = _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps,
                                      HAS_MASK, HAS_NORM, HAS_ROPE, PREC, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A,
                                      BLOCK_B)
        if ALL_VALID:
            p = tl.exp2(s * qk_scale - lse2[:, None])
        else:
            p = tl.where(row_ok[:, None] & valid[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        va, vb = _load_values(V, cols, col_ok, s_vn, s_vd, D, BLOCK_D, VA, BLOCK_VB)
        dp = tl.dot(do, tl.trans(va), input_precision=PREC)
        if VA < D:
            dp += tl.dot(do_b, tl.trans(vb), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(qa.dtype)
        dqa += tl.dot(ds, ka, input_precision=PREC)
        dqb += tl.dot(ds, kb, input_precision=PREC)
    return dqa, dqb


@triton.jit
def _attn_bwd_dq_kernel(
    Q, QW, QF, DO, O, LSE, DELTA, DQ, DQW,
    K1, V1, K1W, K1F, MASK1, K2, V2, K2W, K2F,
    H, N_q, N1, N2, lse_offset, N_total, sm_scale, eps, n_blocks,
    s_qb, s_qh, s_qn, s_qd, s_qfb, s_qfn, s_ob, s_oh, s_on, s_od, s_gb, s_gh, s_gn, s_gd,
    s_k1b, s_k1h, s_k1n, s_k1d, s_v1b, s_v1h, s_v1n, s_v1d, s_k1fb, s_k1fn, s_m1b,
    s_k2b, s_k2h, s_k2n, s_k2d, s_v2b, s_v2h, s_v2n, s_v2d, s_k2fb, s_k2fn,
    Q_NORM: tl.constexpr, Q_ROPE: tl.constexpr, K1_NORM: tl.constexpr, K1_ROPE: tl.constexpr,
    HAS_MASK1: tl.constexpr, K2_NORM: tl.constexpr, K2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VA: tl.constexpr, BLOCK_VB: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
    D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr, ALIGN: tl.constexpr,
):
    """dq of BLOCK_M queries of one stream (do and o: (B, N_q, H, d), both with strides s_o*; dq strides
    s_g*). Also writes delta_i = rowsum(dO ∘ O) of its rows (fp32), which the dk/dv kernel, launched after,
    reads. ALL_VALID1/2: no masked key or query row against key stream 1/2."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_q
    qf = QF + b * s_qfb
    xa, xb = _load_pairs(_head(Q, b, h, s_qb, s_qh, ALIGN), rows, row_ok, s_qn, s_qd, OFF_B, WA, WB, INTERLEAVED,
                         BLOCK_A, BLOCK_B)
    qa, qb = _norm_rope(xa, xb, QW, qf, rows, row_ok, s_qfn, eps, Q_NORM, Q_ROPE, D, OFF_B, WA, WB, INTERLEAVED,
                        BLOCK_A, BLOCK_B)
    qa = qa.to(Q.dtype.element_ty)
    qb = qb.to(Q.dtype.element_ty)
    do, do_b = _load_values(_head(DO, b, h, s_ob, s_oh, ALIGN), rows, row_ok, s_on, s_od, D, BLOCK_D, VA, BLOCK_VB)
    o, o_b = _load_values(_head(O, b, h, s_ob, s_oh, ALIGN), rows, row_ok, s_on, s_od, D, BLOCK_D, VA, BLOCK_VB)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if VA < D:
        delta += tl.sum(do_b.to(tl.float32) * o_b.to(tl.float32), axis=1)
    at = bh.to(tl.int64) * N_total + lse_offset + rows
    tl.store(DELTA + at, delta, mask=row_ok)
    lse2 = tl.load(LSE + at, mask=row_ok, other=0.0) * 1.4426950408889634
    qk_scale = sm_scale * 1.4426950408889634
    dqa = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
    dqa, dqb = _dq_kv_stream(
        dqa, dqb, qa, qb, do, do_b, lse2, delta, _head(K1, b, h, s_k1b, s_k1h, ALIGN),
        _head(V1, b, h, s_v1b, s_v1h, ALIGN), K1W, K1F + b * s_k1fb, MASK1, b, N1, s_k1n, s_k1d, s_v1n, s_v1d,
        s_k1fn, s_m1b, qk_scale, eps, row_ok, HAS_MASK1, K1_NORM, K1_ROPE, BLOCK_N, BLOCK_D, VA, BLOCK_VB, PREC,
        ALL_VALID1, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    dqa, dqb = _dq_kv_stream(
        dqa, dqb, qa, qb, do, do_b, lse2, delta, _head(K2, b, h, s_k2b, s_k2h, ALIGN),
        _head(V2, b, h, s_v2b, s_v2h, ALIGN), K2W, K2F + b * s_k2fb, MASK1, b, N2, s_k2n, s_k2d, s_v2n, s_v2d,
        s_k2fn, s_m1b, qk_scale, eps, row_ok, False, K2_NORM, K2_ROPE, BLOCK_N, BLOCK_D, VA, BLOCK_VB, PREC,
        ALL_VALID2, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    ga, gb, dwa, dwb = _norm_rope_backward(dqa * sm_scale, dqb * sm_scale, xa, xb, QW, qf, rows, row_ok, s_qfn, eps,
                                           Q_NORM, Q_ROPE, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    _store_pairs(_head(DQ, b, h, s_gb, s_gh, ALIGN), rows, row_ok, s_gn, s_gd, ga, gb, OFF_B, WA, WB, INTERLEAVED,
                 BLOCK_A, BLOCK_B)
    if Q_NORM:  # partials (B·H·n_blocks, BLOCK_A + BLOCK_B)
        part = DQW + (bh.to(tl.int64) * n_blocks + pid_m) * (BLOCK_A + BLOCK_B)
        tl.store(part + tl.arange(0, BLOCK_A), dwa)
        tl.store(part + BLOCK_A + tl.arange(0, BLOCK_B), dwb)


@triton.jit
def _dkdv_q_stream(dka, dkb, dv, dv_b, ka, kb, v, v_b, col_valid, Q, QW, QF, DO, LSE, DELTA, bh, b, N_q, lse_offset,
                   N_total, s_qn, s_qd, s_qfn, s_on, s_od, qk_scale, eps,
                   HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   VA: tl.constexpr, BLOCK_VB: tl.constexpr, PREC: tl.constexpr, ALL_VALID: tl.constexpr,
                   D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """ALL_VALID: every key of the program and every query row of the stream is real."""
    for start in range(0, N_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N_q
        qa, qb = _load_pairs(Q, rows, row_ok, s_qn, s_qd, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
        qa, qb = _norm_rope(qa, qb, QW, QF, rows, row_ok, s_qfn, eps, HAS_NORM, HAS_ROPE,
                            D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
        qa = qa.to(ka.dtype)
        qb = qb.to(kb.dtype)
        do, do_b = _load_values(DO, rows, row_ok, s_on, s_od, D, BLOCK_D, VA, BLOCK_VB)
        at = bh.to(tl.int64) * N_total + lse_offset + rows
        lse2 = tl.load(LSE + at, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + at, mask=row_ok, other=0.0)
        # transposed scores sT [BLOCK_N, BLOCK_M]: keys of this program × queries of the block
        st = tl.dot(ka, tl.trans(qa), input_precision=PREC) + tl.dot(kb, tl.trans(qb), input_precision=PREC)
        if ALL_VALID:
            pt = tl.exp2(st * qk_scale - lse2[None, :])
        else:
            pt = tl.where(col_valid[:, None] & row_ok[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        pt = pt.to(do.dtype)
        dv += tl.dot(pt, do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        if VA < D:
            dv_b += tl.dot(pt, do_b, input_precision=PREC)
            dpt += tl.dot(v_b, tl.trans(do_b), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
        dka += tl.dot(dst, qa, input_precision=PREC)
        dkb += tl.dot(dst, qb, input_precision=PREC)
    return dka, dkb, dv, dv_b


@triton.jit
def _attn_bwd_dkdv_kernel(
    K, V, KW, KF, MASK, DK, DV, DKW,
    Q1, QW1, QF1, DO1, Q2, QW2, QF2, DO2, LSE, DELTA,
    H, N_kv, N1, N2, N_total, sm_scale, eps, n_blocks,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_kfb, s_kfn, s_mb,
    s_gb, s_gh, s_gn, s_gd, s_hb, s_hh, s_hn, s_hd,
    s_q1b, s_q1h, s_q1n, s_q1d, s_q1fb, s_q1fn, s_o1b, s_o1h, s_o1n, s_o1d,
    s_q2b, s_q2h, s_q2n, s_q2d, s_q2fb, s_q2fn, s_o2b, s_o2h, s_o2n, s_o2d,
    K_NORM: tl.constexpr, K_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, Q1_NORM: tl.constexpr,
    Q1_ROPE: tl.constexpr, Q2_NORM: tl.constexpr, Q2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VA: tl.constexpr, BLOCK_VB: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
    D: tl.constexpr, OFF_B: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr, ALIGN: tl.constexpr,
):
    """dk, dv of BLOCK_N keys of one stream against every query: stream 1 (text, lse positions from 0),
    then stream 2 (image, from N1). dk strides s_g*, dv strides s_h*. ALL_VALID1/2: no masked key or
    query row against query stream 1/2."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_kv
    col_valid = _key_valid(MASK, b, s_mb, cols, col_ok, HAS_MASK)
    kf = KF + b * s_kfb
    xa, xb = _load_pairs(_head(K, b, h, s_kb, s_kh, ALIGN), cols, col_ok, s_kn, s_kd, OFF_B, WA, WB, INTERLEAVED,
                         BLOCK_A, BLOCK_B)
    ka, kb = _norm_rope(xa, xb, KW, kf, cols, col_ok, s_kfn, eps, K_NORM, K_ROPE, D, OFF_B, WA, WB, INTERLEAVED,
                        BLOCK_A, BLOCK_B)
    ka = ka.to(K.dtype.element_ty)
    kb = kb.to(K.dtype.element_ty)
    v, v_b = _load_values(_head(V, b, h, s_vb, s_vh, ALIGN), cols, col_ok, s_vn, s_vd, D, BLOCK_D, VA, BLOCK_VB)
    qk_scale = sm_scale * 1.4426950408889634
    dka = tl.zeros([BLOCK_N, BLOCK_A], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, BLOCK_VB], dtype=tl.float32)
    dka, dkb, dv, dv_b = _dkdv_q_stream(
        dka, dkb, dv, dv_b, ka, kb, v, v_b, col_valid, _head(Q1, b, h, s_q1b, s_q1h, ALIGN), QW1, QF1 + b * s_q1fb,
        _head(DO1, b, h, s_o1b, s_o1h, ALIGN), LSE, DELTA, bh, b, N1, 0, N_total, s_q1n, s_q1d, s_q1fn, s_o1n, s_o1d,
        qk_scale, eps, Q1_NORM, Q1_ROPE, BLOCK_M, BLOCK_D, VA, BLOCK_VB, PREC, ALL_VALID1,
        D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    dka, dkb, dv, dv_b = _dkdv_q_stream(
        dka, dkb, dv, dv_b, ka, kb, v, v_b, col_valid, _head(Q2, b, h, s_q2b, s_q2h, ALIGN), QW2, QF2 + b * s_q2fb,
        _head(DO2, b, h, s_o2b, s_o2h, ALIGN), LSE, DELTA, bh, b, N2, N1, N_total, s_q2n, s_q2d, s_q2fn, s_o2n, s_o2d,
        qk_scale, eps, Q2_NORM, Q2_ROPE, BLOCK_M, BLOCK_D, VA, BLOCK_VB, PREC, ALL_VALID2,
        D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    ga, gb, dwa, dwb = _norm_rope_backward(dka * sm_scale, dkb * sm_scale, xa, xb, KW, kf, cols, col_ok, s_kfn, eps,
                                           K_NORM, K_ROPE, D, OFF_B, WA, WB, INTERLEAVED, BLOCK_A, BLOCK_B)
    _store_pairs(_head(DK, b, h, s_gb, s_gh, ALIGN), cols, col_ok, s_gn, s_gd, ga, gb, OFF_B, WA, WB, INTERLEAVED,
                 BLOCK_A, BLOCK_B)
    _store_values(_head(DV, b, h, s_hb, s_hh, ALIGN), cols, col_ok, s_hn, s_hd, dv, dv_b, D, BLOCK_D, VA, BLOCK_VB)
    if K_NORM:
        part = DKW + (bh.to(tl.int64) * n_blocks + pid_n) * (BLOCK_A + BLOCK_B)
        tl.store(part + tl.arange(0, BLOCK_A), dwa)
        tl.store(part + BLOCK_A + tl.arange(0, BLOCK_B), dwb)


# ------------------------------------------------------------------------------------------ launchers

class Stream:
    """One token stream's tensors as the kernels take them: q, k, v (B, N, H, d) (any strides); the
    optional q/k norm weights (d,) and RoPE table ((N, d/2, 2) or (B, N, d/2, 2) fp32, pairs contiguous);
    the optional int8 key mask (B, N) (text only)."""

    def __init__(self, q, k, v, q_weight=None, k_weight=None, freqs=None, mask=None):
        self.q, self.k, self.v = q, k, v
        self.q_weight, self.k_weight, self.mask = q_weight, k_weight, mask
        if freqs is not None and not (freqs.stride(-1) == 1 and freqs.stride(-2) == 2):
            freqs = freqs.contiguous()
        self.freqs = freqs
        for t in (q, k, v):  # in-head offsets are 32-bit in the kernels
            if t.shape[1] and (t.shape[1] - 1) * t.stride(1) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
                raise ValueError(f"attention kernel: a (B, N, H, d) tensor of shape {tuple(t.shape)} and strides "
                                 f"{t.stride()} has offsets within one head beyond 2**31 elements")

    @property
    def n(self) -> int:
        return self.q.shape[1]

    def freq_args(self):
        """(tensor, stride over samples, stride over tokens); a dummy pointer without a table."""
        f = self.freqs
        if f is None:
            return self.q, 0, 0
        if f.dim() == 3:
            return f, 0, f.stride(0)
        return f, (f.stride(0) if f.shape[0] > 1 else 0), f.stride(1)


def _bhnd(t):
    """Strides (b, h, n, d) of a (B, N, H, d) tensor."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def _config(d: int, dtype: torch.dtype, device: torch.device, block_m: Optional[int], block_n: Optional[int],
            num_warps: Optional[int], num_stages: Optional[int], kernel: str):
    """Tiles and launch options of one kernel ("fwd", "dq" or "dkdv"): (BLOCK_M, BLOCK_N, warps, stages);
    BLOCK_M counts queries and BLOCK_N keys in all three. GPU defaults for 16-bit inputs from
    benchmarks/tune_attention.py on an H100 (2026-11-22; in benchmarks/results/archive/2026-11-22_h100_attention_tuning/:
    2026-11-22_h100_tune_attention_headdims.json and …_tune_attention_bwd_split_dq.json, …_dkdv.json):
    - forward 128 × 128 with 8 warps and 3 stages at head dim 128 (flux1024, long), 128 × 64 below it
      (sd3_1024 and dit512 at d = 64: +14% and +21% over 128 × 128), with 4 warps at d = 72 (dit-xl256:
      +30% over 8);
    - dq: 128 queries held against 64 streamed keys, 8 warps, 3 stages (32 keys at d = 72); at d = 80 and 96
      64 × 64 with 4 warps, which was 5–6% faster there at (64, 16, 256, d);
    - dk/dv: 128 keys held against 64 streamed queries with 8 warps at d = 128, else 64 × 64 with 4 warps;
      3 stages.
    Against one 64 × 64 configuration for both backward kernels
    (benchmarks/results/archive/2026-11-22_h100_attention_probes/2026-11-22_h100_attention_bwd_split_ab.json,
    same gradients bit for bit): backward +6.7% at flux1024, +3.0% sd3_1024, +2.8% dit-xl256, +3.8% dit512,
    +6.4% long.
    fp32 inputs (exact "ieee" dots, no tensor cores; a correctness path) take small tiles: at the 16-bit
    tiles they overflow shared memory, and each fallback step of a refused launch is another slow compile.
    16 × 16 in the interpreter."""
    interpret = device.type != "cuda"
    wide = dtype == torch.float32
    if interpret:
        default = (16, 16, 4, 1)
    elif kernel == "fwd":
        default = ((64, 64, 4, 2) if wide else
                   (128, 128 if d >= 128 else 64, 4 if d == 72 else 8, 3))
    elif wide:
        default = (32, 32, 4, 1)
    elif kernel == "dq":
        default = (64, 64, 4, 3) if d in (80, 96) else (128, 32 if d == 72 else 64, 8, 3)
    else:
        default = (64, 128, 8, 3) if d >= 128 else (64, 64, 4, 3)
    return block_m or default[0], block_n or default[1], num_warps or default[2], num_stages or default[3]


def _widest_pow2_split(d: int):
    """d = main + rest with main the widest power of two ≤ d: (main, rest, the rest's tile width ≥ 16)."""
    main = 1 << (d.bit_length() - 1)
    return main, d - main, _utils.next_pow2(max(d - main, 16))


def _value_layout(d: int) -> dict:
    """How rows of v, o and do are held (``_load_values``): the widest power of two and the rest (72 = 64 + 8
    in a 16-wide tile); a power of two is one tile (VA = d)."""
    main, _, rest_block = _widest_pow2_split(d)
    return dict(BLOCK_D=main, VA=main, BLOCK_VB=rest_block)


def _channel_layout(d: int, rope: bool, interleaved: bool) -> dict:
    """How q and k rows are held as the two tiles (a, b) of the kernels (compile-time constants):
    ``D`` the head dim; ``WA``/``WB`` the real channels of each tile; ``BLOCK_A``/``BLOCK_B`` their
    power-of-two widths (≥ 16, tl.dot's least); ``OFF_B`` where b starts; ``INTERLEAVED``.

    RoPE rotates channel pairs, so with RoPE the tiles are the pairs' two members: the even and odd
    channels (interleaved) or the two halves, each d/2 wide. Without RoPE any split will do, and a
    power-of-two head dim is split in halves while others take the widest power of two and the rest:
    72 = 64 + 8 (a 16-wide tile), 80 = 64 + 16, 96 = 64 + 32. That keeps the tiles aligned (halves of 72
    would start b at channel 36, 72 bytes in, which cannot be copied asynchronously in 16-byte pieces) and
    the dot products 80 wide rather than 2 × 64 = 128."""
    if rope or (d & (d - 1)) == 0:
        half = d // 2
        block = _utils.next_pow2(max(half, 16))
        return dict(D=d, OFF_B=half, WA=half, WB=half, INTERLEAVED=rope and interleaved, BLOCK_A=block,
                    BLOCK_B=block)
    main, rest, rest_block = _widest_pow2_split(d)
    return dict(D=d, OFF_B=main, WA=main, WB=rest, INTERLEAVED=False, BLOCK_A=main, BLOCK_B=rest_block)


def _head_align(tensors, *strides: int) -> int:
    """The largest power of two up to 16 that divides every sample and head stride (in elements) of these
    (B, N, H, d) tensors, and the further strides given: the kernels' ALIGN."""
    g = math.gcd(0, *strides)
    for t in tensors:
        g = math.gcd(g, t.stride(0), t.stride(2))
    return 16 if g == 0 else min(16, g & -g)


def _stride_kwargs(names: str, *values):
    names = names.split()
    assert len(names) == len(values)
    return dict(zip(names, values))


# Tile configurations to fall back to, in order, when a launch runs out of shared memory or registers
# (fused QK-norm/RoPE with wide head dims needs more than the plain kernel; GPUs with less shared memory
# per SM than the H100 the defaults were tuned on). Forward and both backward kernels use them.
_FALLBACKS = [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)]


def _with_fallback(launch, config, explicit: bool, kwargs):
    """Launch with ``config`` (BLOCK_M, BLOCK_N, warps, stages); if Triton reports OutOfResources and the
    configuration was not asked for explicitly, retry with the smaller ones of :data:`_FALLBACKS`, and
    raise the last OutOfResources when none fits."""
    from triton.runtime.errors import OutOfResources

    m, n, _, stages = config
    smaller = [c for c in _FALLBACKS  # tiles within the config's, and smaller or with fewer pipeline stages
               if c[0] <= m and c[1] <= n and (c[0] * c[1] < m * n or c[3] < stages)]
    candidates = [config] + ([] if explicit else smaller)
    for i, cfg in enumerate(candidates):
        try:
            return launch(*cfg, **kwargs)
        except OutOfResources:
            if i == len(candidates) - 1:
                raise


def _layout(d: int, interleaved: bool, txt: Stream, img: Stream) -> dict:
    """The kernels' compile-time channel layout: q and k (``_channel_layout``; RoPE on either stream fixes
    the pairs for both) and v, o, do (``_value_layout``)."""
    return {**_channel_layout(d, txt.freqs is not None or img.freqs is not None, interleaved), **_value_layout(d)}


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(txt: Stream, img: Stream, sm_scale: float, eps: float, interleaved: bool, *,
                  block_m: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
                  num_stages: Optional[int] = None):
    """Forward. Returns (o_img, o_txt, lse): outputs (B, N, H, d) contiguous, lse (B, H, N_txt + N_img)."""
    B, N_img, H, d = img.q.shape
    N_txt = txt.n
    N = N_txt + N_img
    dev = img.q.device
    layout = _layout(d, interleaved, txt, img)
    BM, BN, warps, stages = _config(d, img.q.dtype, dev, block_m, block_n, num_warps, num_stages, "fwd")
    o_img = _utils.new_empty((B, N_img, H, d), img.q.dtype, dev)
    o_txt = _utils.new_empty((B, N_txt, H, d), img.q.dtype, dev)
    align = _head_align((txt.q, txt.k, txt.v, img.q, img.k, img.v, o_img, o_txt))
    lse = _utils.new_empty((B, H, N), torch.float32, dev)
    mask = txt.mask if txt.mask is not None else img.q
    k1f, s_k1fb, s_k1fn = txt.freq_args()
    k2f, s_k2fb, s_k2fn = img.freq_args()
    for q_stream, out, offset in ((txt, o_txt, 0), (img, o_img, N_txt)):
        if q_stream.n == 0:
            continue
        qf, s_qfb, s_qfn = q_stream.freq_args()
        launch = lambda BM, BN, warps, stages, **kw: _attn_fwd_kernel[(_utils.cdiv(q_stream.n, BM), B * H)](  # noqa
            **kw, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
            ALL_VALID1=txt.mask is None and N_txt % BN == 0, ALL_VALID2=N_img % BN == 0)
        _with_fallback(launch, (BM, BN, warps, stages), explicit=block_m is not None or block_n is not None,
                       kwargs=dict(
            Q=q_stream.q, QW=q_stream.q_weight if q_stream.q_weight is not None else q_stream.q, QF=qf, OUT=out,
            LSE=lse, K1=txt.k, V1=txt.v, K1W=txt.k_weight if txt.k_weight is not None else txt.k, K1F=k1f,
            MASK1=mask, K2=img.k, V2=img.v, K2W=img.k_weight if img.k_weight is not None else img.k, K2F=k2f,
            H=H, N_q=q_stream.n, N1=N_txt, N2=N_img, lse_offset=offset, N_total=N, sm_scale=sm_scale, eps=eps,
            **_stride_kwargs(
                "s_qb s_qh s_qn s_qd s_qfb s_qfn s_ob s_oh s_on s_od s_k1b s_k1h s_k1n s_k1d s_v1b s_v1h s_v1n s_v1d "
                "s_k1fb s_k1fn s_m1b s_k2b s_k2h s_k2n s_k2d s_v2b s_v2h s_v2n s_v2d s_k2fb s_k2fn",
                *_bhnd(q_stream.q), s_qfb, s_qfn, *_bhnd(out),
                *_bhnd(txt.k), *_bhnd(txt.v), s_k1fb, s_k1fn, mask.stride(0) if txt.mask is not None else 0,
                *_bhnd(img.k), *_bhnd(img.v), s_k2fb, s_k2fn),
            Q_NORM=q_stream.q_weight is not None, Q_ROPE=q_stream.freqs is not None,
            K1_NORM=txt.k_weight is not None, K1_ROPE=txt.freqs is not None, HAS_MASK1=txt.mask is not None,
            K2_NORM=img.k_weight is not None, K2_ROPE=img.freqs is not None,
            PREC=_prec(img.q.dtype), ALIGN=align, **layout))
    return o_img, o_txt, lse


def _tiles_to_channels(part_sum: torch.Tensor, layout: dict) -> torch.Tensor:
    """(BLOCK_A + BLOCK_B,) sums in the (a, b) tiles' layout -> (d,) in the weight's channel order."""
    a = part_sum[:layout["WA"]]
    b = part_sum[layout["BLOCK_A"]:layout["BLOCK_A"] + layout["WB"]]
    if layout["INTERLEAVED"]:
        return torch.stack([a, b], dim=-1).reshape(layout["D"])
    return torch.cat([a, b])


def attention_bwd(do_img: torch.Tensor, do_txt: torch.Tensor, txt: Stream, img: Stream, o_img: torch.Tensor,
                  o_txt: torch.Tensor, lse: torch.Tensor, sm_scale: float, eps: float, interleaved: bool, *,
                  block_m: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
                  num_stages: Optional[int] = None, dkdv_config: Optional[Tuple[int, int, int, int]] = None):
    """Backward. Returns a dict with dq/dk/dv of each stream ("dq_img", …, "dv_txt") and, where the stream
    has norm weights, their gradients ("dq_weight_img", "dk_weight_img", "dq_weight_txt", "dk_weight_txt")
    as fp32 (d,) sums in a fixed order.

    block_m/block_n/num_warps/num_stages set the dq kernel's launch (BLOCK_M queries held, BLOCK_N keys
    streamed) and, unless ``dkdv_config`` = (BLOCK_M queries streamed, BLOCK_N keys held, warps, stages)
    is given, the dk/dv kernel's too."""
    B, N_img, H, d = img.q.shape
    N_txt = txt.n
    N = N_txt + N_img
    dev = img.q.device
    layout = _layout(d, interleaved, txt, img)
    tile_channels = layout["BLOCK_A"] + layout["BLOCK_B"]
    BM, BN, warps, stages = _config(d, img.q.dtype, dev, block_m, block_n, num_warps, num_stages, "dq")
    explicit = block_m is not None or block_n is not None  # asked-for tiles are not silently replaced
    if dkdv_config is not None:
        dkdv, explicit_dkdv = tuple(dkdv_config), True
    elif any(x is not None for x in (block_m, block_n, num_warps, num_stages)):
        dkdv, explicit_dkdv = (BM, BN, warps, stages), explicit
    else:
        dkdv, explicit_dkdv = _config(d, img.q.dtype, dev, None, None, None, None, "dkdv"), False
    # delta_i = rowsum(dO ∘ O), fp32 (B, H, N) with text positions first: written by the dq kernel, which
    # reads do and o with one set of strides
    delta = _utils.new_empty((B, H, N), torch.float32, dev)
    if do_txt.stride() != o_txt.stride():
        do_txt, o_txt = do_txt.contiguous(), o_txt.contiguous()
    if do_img.stride() != o_img.stride():
        do_img, o_img = do_img.contiguous(), o_img.contiguous()
    mask = txt.mask if txt.mask is not None else img.q
    s_mb = mask.stride(0) if txt.mask is not None else 0
    k1f, s_k1fb, s_k1fn = txt.freq_args()
    k2f, s_k2fb, s_k2fn = img.freq_args()
    grads = {}
    prec = _prec(img.q.dtype)
    # the gradients are allocated contiguous: head strides d, sample strides N·H·d
    align = _head_align((txt.q, txt.k, txt.v, img.q, img.k, img.v, do_img, do_txt), d)
    for name, q_stream, do, o in (("txt", txt, do_txt, o_txt), ("img", img, do_img, o_img)):
        dq = _utils.new_empty(tuple(q_stream.q.shape), q_stream.q.dtype, dev)
        grads["dq_" + name] = dq
        if q_stream.n == 0:
            if q_stream.q_weight is not None:
                grads["dq_weight_" + name] = torch.zeros(d, device=dev, dtype=torch.float32)
            continue
        qf, s_qfb, s_qfn = q_stream.freq_args()

        def launch_dq(block_m, block_n, warps, stages):
            n_blocks = _utils.cdiv(q_stream.n, block_m)
            rows_full = q_stream.n % block_m == 0
            part = (torch.empty((B * H * n_blocks, tile_channels), device=dev, dtype=torch.float32)
                    if q_stream.q_weight is not None else dq)
            _attn_bwd_dq_kernel[(n_blocks, B * H)](
                q_stream.q, q_stream.q_weight if q_stream.q_weight is not None else q_stream.q, qf, do, o, lse, delta,
                dq, part, txt.k, txt.v, txt.k_weight if txt.k_weight is not None else txt.k, k1f, mask,
                img.k, img.v, img.k_weight if img.k_weight is not None else img.k, k2f,
                H, q_stream.n, N_txt, N_img, 0 if name == "txt" else N_txt, N, sm_scale, eps, n_blocks,
                *_bhnd(q_stream.q), s_qfb, s_qfn, *_bhnd(do), *_bhnd(dq),
                *_bhnd(txt.k), *_bhnd(txt.v), s_k1fb, s_k1fn, s_mb, *_bhnd(img.k), *_bhnd(img.v), s_k2fb, s_k2fn,
                Q_NORM=q_stream.q_weight is not None, Q_ROPE=q_stream.freqs is not None,
                K1_NORM=txt.k_weight is not None, K1_ROPE=txt.freqs is not None, HAS_MASK1=txt.mask is not None,
                K2_NORM=img.k_weight is not None, K2_ROPE=img.freqs is not None, ALIGN=align, **layout,
                BLOCK_M=block_m, BLOCK_N=block_n, PREC=prec, num_warps=warps,
                num_stages=stages, ALL_VALID1=rows_full and txt.mask is None and N_txt % block_n == 0,
                ALL_VALID2=rows_full and N_img % block_n == 0)
            return part

        part = _with_fallback(launch_dq, (BM, BN, warps, stages), explicit, {})
        if q_stream.q_weight is not None:
            grads["dq_weight_" + name] = _tiles_to_channels(part.sum(0), layout)
    q1f, s_q1fb, s_q1fn = txt.freq_args()
    q2f, s_q2fb, s_q2fn = img.freq_args()
    for name, kv in (("txt", txt), ("img", img)):
        dk = _utils.new_empty(tuple(kv.k.shape), kv.k.dtype, dev)
        dv = _utils.new_empty(tuple(kv.v.shape), kv.v.dtype, dev)
        grads["dk_" + name], grads["dv_" + name] = dk, dv
        if kv.n == 0:
            if kv.k_weight is not None:
                grads["dk_weight_" + name] = torch.zeros(d, device=dev, dtype=torch.float32)
            continue
        kf, s_kfb, s_kfn = kv.freq_args()
        kv_mask = kv.mask is not None

        def launch_dkdv(block_m, block_n, warps, stages):
            n_blocks = _utils.cdiv(kv.n, block_n)
            keys_full = not kv_mask and kv.n % block_n == 0
            part = (torch.empty((B * H * n_blocks, tile_channels), device=dev, dtype=torch.float32)
                    if kv.k_weight is not None else dk)
            _attn_bwd_dkdv_kernel[(n_blocks, B * H)](
                kv.k, kv.v, kv.k_weight if kv.k_weight is not None else kv.k, kf, kv.mask if kv_mask else kv.k,
                dk, dv, part,
                txt.q, txt.q_weight if txt.q_weight is not None else txt.q, q1f, do_txt,
                img.q, img.q_weight if img.q_weight is not None else img.q, q2f, do_img, lse, delta,
                H, kv.n, N_txt, N_img, N, sm_scale, eps, n_blocks,
                *_bhnd(kv.k), *_bhnd(kv.v), s_kfb, s_kfn, kv.mask.stride(0) if kv_mask else 0,
                *_bhnd(dk), *_bhnd(dv),
                *_bhnd(txt.q), s_q1fb, s_q1fn, *_bhnd(do_txt), *_bhnd(img.q), s_q2fb, s_q2fn, *_bhnd(do_img),
                K_NORM=kv.k_weight is not None, K_ROPE=kv.freqs is not None, HAS_MASK=kv_mask,
                Q1_NORM=txt.q_weight is not None, Q1_ROPE=txt.freqs is not None,
                Q2_NORM=img.q_weight is not None, Q2_ROPE=img.freqs is not None, ALIGN=align, **layout,
                BLOCK_M=block_m, BLOCK_N=block_n, PREC=prec, num_warps=warps,
                num_stages=stages, ALL_VALID1=keys_full and N_txt % block_m == 0,
                ALL_VALID2=keys_full and N_img % block_m == 0)
            return part

        part = _with_fallback(launch_dkdv, dkdv, explicit_dkdv, {})
        if kv.k_weight is not None:
            grads["dk_weight_" + name] = _tiles_to_channels(part.sum(0), layout)
    return grads

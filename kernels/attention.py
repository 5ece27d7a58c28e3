"""Joint image-text flash attention with fused QK RMSNorm and RoPE, forward and backward.

One softmax attention over the concatenation [text, image] (SD3/Flux MMDiT; no text = DiT self-attention),
read straight from each stream's own q/k/v tensors — no concatenation copy — and written to each
stream's own output. Tiled with an online softmax (O(N) memory); the log-sum-exp is saved for the
backward, which recomputes the probabilities.

Fused on load (optional, per stream): QK RMSNorm ``x * rsqrt(mean(x²) + eps) * w`` and RoPE (rotation of
channel pairs by a [cos, sin] table, interleaved or half-split pairs). q and k are held as two tiles
``(a, b)`` of channel pairs — the even/odd channels (interleaved) or the two halves — which is what the
rotation needs; QKᵀ = a_q·a_kᵀ + b_q·b_kᵀ is the same dot product in another channel order.

Launch structure: one launch per query stream (forward; backward dq) and one per key/value stream
(backward dk, dv); each program loops over the text keys, then the image keys (or queries). The backward
is deterministic: dq and (dk, dv) come from separate kernels, each accumulating in registers; the norm
weight gradients are per-program fp32 partials summed in a fixed order by the launcher.

Shapes: q, k, v (B, N, H, d) of each stream, any strides (``(B, H, N, d)`` views too); key mask of the
text stream int8 (B, N_txt) (1 = real token); RoPE tables (N, d/2, 2) or (B, N, d/2, 2) float32 with
contiguous pairs; lse (B, H, N_txt + N_img) float32, natural log, text positions first.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils

LOG2E = 1.4426950408889634


@triton.jit
def _pair_offsets(HALF, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        off_a = 2 * i
        off_b = 2 * i + 1
    else:
        off_a = i
        off_b = i + HALF
    return off_a, off_b, i < HALF


@triton.jit
def _load_pairs(ptr, rows, row_ok, s_n, s_d, HALF, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rows of q or k as pair tiles (a, b), each [R, BLOCK_HALF], in the input dtype (a tile that goes
    straight into tl.dot must not pass through float32: the software pipeliner only streams loads that
    feed a dot directly). Interleaved rows are loaded whole (contiguous, vectorised) and split; half-split
    rows as two contiguous halves. In-head offsets are 32-bit (the launcher checks they fit)."""
    base = ptr + rows[:, None] * s_n
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.load(base + c[None, :] * s_d, mask=row_ok[:, None] & (c < 2 * HALF)[None, :], other=0.0)
        a, b = tl.split(tl.reshape(x, [x.shape[0], BLOCK_HALF, 2]))
    else:
        i = tl.arange(0, BLOCK_HALF)
        mask = row_ok[:, None] & (i < HALF)[None, :]
        a = tl.load(base + i[None, :] * s_d, mask=mask, other=0.0)
        b = tl.load(base + (i + HALF)[None, :] * s_d, mask=mask, other=0.0)
    return a, b


@triton.jit
def _store_pairs(ptr, rows, row_ok, s_n, s_d, HALF, a, b, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    base = ptr + rows[:, None] * s_n
    if INTERLEAVED:
        c = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.reshape(tl.join(a, b), [a.shape[0], 2 * BLOCK_HALF])
        tl.store(base + c[None, :] * s_d, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (c < 2 * HALF)[None, :])
    else:
        i = tl.arange(0, BLOCK_HALF)
        mask = row_ok[:, None] & (i < HALF)[None, :]
        tl.store(base + i[None, :] * s_d, a.to(ptr.dtype.element_ty), mask=mask)
        tl.store(base + (i + HALF)[None, :] * s_d, b.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_pairs(W, HALF, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    off_a, off_b, half_ok = _pair_offsets(HALF, INTERLEAVED, BLOCK_HALF)
    wa = tl.load(W + off_a, mask=half_ok, other=0.0).to(tl.float32)
    wb = tl.load(W + off_b, mask=half_ok, other=0.0).to(tl.float32)
    return wa[None, :], wb[None, :]


@triton.jit
def _cos_sin(FREQS, rows, row_ok, s_fn, HALF, BLOCK_HALF: tl.constexpr):
    i = tl.arange(0, BLOCK_HALF)
    mask = row_ok[:, None] & (i < HALF)[None, :]
    at = FREQS + rows[:, None] * s_fn + 2 * i[None, :]
    return tl.load(at, mask=mask, other=1.0), tl.load(at + 1, mask=mask, other=0.0)


@triton.jit
def _norm_rope(a, b, W, FREQS, rows, row_ok, s_fn, HALF, eps,
               HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
               BLOCK_HALF: tl.constexpr):
    """(a, b) -> RoPE(RMSNorm(x) * w) in float32; unchanged (input dtype) when there is neither."""
    if HAS_NORM or HAS_ROPE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
        wa, wb = _weight_pairs(W, HALF, INTERLEAVED, BLOCK_HALF)
        a = a * rstd[:, None] * wa
        b = b * rstd[:, None] * wb
    if HAS_ROPE:
        cos, sin = _cos_sin(FREQS, rows, row_ok, s_fn, HALF, BLOCK_HALF)
        a, b = a * cos - b * sin, a * sin + b * cos
    return a, b


@triton.jit
def _norm_rope_backward(ga, gb, xa, xb, W, FREQS, rows, row_ok, s_fn, HALF, eps,
                        HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                        BLOCK_HALF: tl.constexpr):
    """Gradient (ga, gb) w.r.t. RoPE(RMSNorm(x) * w) -> gradient w.r.t. x, and the per-pair-channel
    sums over rows of the weight gradient (zeros without the norm)."""
    if HAS_ROPE:  # rotation by -θ
        cos, sin = _cos_sin(FREQS, rows, row_ok, s_fn, HALF, BLOCK_HALF)
        ga, gb = ga * cos + gb * sin, gb * cos - ga * sin
    dwa = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    dwb = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    if HAS_NORM:
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / (2 * HALF) + eps)
        wa, wb = _weight_pairs(W, HALF, INTERLEAVED, BLOCK_HALF)
        ha = xa * rstd[:, None]
        hb = xb * rstd[:, None]
        dwa = tl.sum(ga * ha, axis=0)
        dwb = tl.sum(gb * hb, axis=0)
        gwa = ga * wa
        gwb = gb * wb
        c = (tl.sum(gwa * ha, axis=1) + tl.sum(gwb * hb, axis=1)) / (2 * HALF)
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
def _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps, HALF,
               HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
               BLOCK_HALF: tl.constexpr, PREC: tl.constexpr):
    """One block of keys against the program's queries: the prepared key pairs (in the query dtype), the raw
    scores q·kᵀ [BLOCK_M, BLOCK_N] and which keys are real."""
    ka, kb = _load_pairs(K, cols, col_ok, s_kn, s_kd, HALF, INTERLEAVED, BLOCK_HALF)
    ka, kb = _norm_rope(ka, kb, KW, KF, cols, col_ok, s_fn, HALF, eps, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF)
    ka = ka.to(qa.dtype)
    kb = kb.to(qb.dtype)
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC) + tl.dot(qb, tl.trans(kb), input_precision=PREC)
    return ka, kb, s, _key_valid(MASK, b, s_mb, cols, col_ok, HAS_MASK)


@triton.jit
def _load_rows(ptr, rows, row_ok, s_n, s_d, D, BLOCK_D: tl.constexpr):
    """Rows of v, o or do as a [R, BLOCK_D] tile (input dtype)."""
    dcols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * s_n + dcols[None, :] * s_d, mask=row_ok[:, None] & (dcols < D)[None, :],
                   other=0.0)


# ------------------------------------------------------------------------------------------ forward

@triton.jit
def _fwd_kv_stream(acc, l_i, m_i, qa, qb, K, V, KW, KF, MASK, b, N_kv, s_kn, s_kd, s_vn, s_vd, s_fn, s_mb,
                   qk_scale, eps, HALF, D,
                   HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr, ALL_VALID: tl.constexpr):
    """ALL_VALID: every key is real (no mask, N_kv a multiple of BLOCK_N). The scores then need no -inf
    select, and scaling folds into the exponent's argument (one FMA per score instead of a multiply, a
    select and a subtract): the softmax's elementwise work competes with the tensor cores for issue
    slots."""
    for start in range(0, N_kv, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N_kv
        _, _, s, valid = _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps, HALF,
                                    HAS_MASK, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF, PREC)
        if ALL_VALID:
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        else:
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, cols, col_ok, s_vn, s_vd, D, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, QW, QF, OUT, LSE,
    K1, V1, K1W, K1F, MASK1, K2, V2, K2W, K2F,
    H, N_q, N1, N2, lse_offset, N_total, sm_scale, eps, HALF, D,
    s_qb, s_qh, s_qn, s_qd, s_qfb, s_qfn, s_ob, s_oh, s_on, s_od,
    s_k1b, s_k1h, s_k1n, s_k1d, s_v1b, s_v1h, s_v1n, s_v1d, s_k1fb, s_k1fn, s_m1b,
    s_k2b, s_k2h, s_k2n, s_k2d, s_v2b, s_v2h, s_v2n, s_v2d, s_k2fb, s_k2fn,
    Q_NORM: tl.constexpr, Q_ROPE: tl.constexpr, K1_NORM: tl.constexpr, K1_ROPE: tl.constexpr,
    HAS_MASK1: tl.constexpr, K2_NORM: tl.constexpr, K2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
):
    """Program (m, b·H + h): BLOCK_M queries of one stream against stream 1's keys (the text, masked),
    then stream 2's (the image). ALL_VALID1/2: see ``_fwd_kv_stream``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_q
    qa, qb = _load_pairs(Q + b * s_qb + h * s_qh, rows, row_ok, s_qn, s_qd, HALF, INTERLEAVED, BLOCK_HALF)
    qa, qb = _norm_rope(qa, qb, QW, QF + b * s_qfb, rows, row_ok, s_qfn, HALF, eps, Q_NORM, Q_ROPE, INTERLEAVED,
                        BLOCK_HALF)
    qa = qa.to(Q.dtype.element_ty)
    qb = qb.to(Q.dtype.element_ty)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block leaves it unchanged
    acc, l_i, m_i = _fwd_kv_stream(acc, l_i, m_i, qa, qb, K1 + b * s_k1b + h * s_k1h, V1 + b * s_v1b + h * s_v1h,
                                   K1W, K1F + b * s_k1fb, MASK1, b, N1, s_k1n, s_k1d, s_v1n, s_v1d, s_k1fn, s_m1b,
                                   qk_scale, eps, HALF, D, HAS_MASK1, K1_NORM, K1_ROPE, INTERLEAVED, BLOCK_N,
                                   BLOCK_HALF, BLOCK_D, PREC, ALL_VALID1)
    acc, l_i, m_i = _fwd_kv_stream(acc, l_i, m_i, qa, qb, K2 + b * s_k2b + h * s_k2h, V2 + b * s_v2b + h * s_v2h,
                                   K2W, K2F + b * s_k2fb, MASK1, b, N2, s_k2n, s_k2d, s_v2n, s_v2d, s_k2fn, s_m1b,
                                   qk_scale, eps, HALF, D, False, K2_NORM, K2_ROPE, INTERLEAVED, BLOCK_N,
                                   BLOCK_HALF, BLOCK_D, PREC, ALL_VALID2)
    out = acc / l_i[:, None]
    dcols = tl.arange(0, BLOCK_D)
    o_ptr = OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + dcols[None, :] * s_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dcols < D)[None, :])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + bh.to(tl.int64) * N_total + lse_offset + rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------ backward

@triton.jit
def _dq_kv_stream(dqa, dqb, qa, qb, do, lse2, delta, K, V, KW, KF, MASK, b, N_kv, s_kn, s_kd, s_vn, s_vd,
                  s_fn, s_mb, qk_scale, eps, HALF, D, row_ok,
                  HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                  INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr, ALL_VALID: tl.constexpr):
    """ALL_VALID: every key and every query row of the program is real (see ``_fwd_kv_stream``)."""
    for start in range(0, N_kv, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N_kv
        ka, kb, s, valid = _key_block(qa, qb, K, KW, KF, MASK, b, cols, col_ok, s_kn, s_kd, s_fn, s_mb, eps, HALF,
                                      HAS_MASK, HAS_NORM, HAS_ROPE, INTERLEAVED, BLOCK_HALF, PREC)
        if ALL_VALID:
            p = tl.exp2(s * qk_scale - lse2[:, None])
        else:
            p = tl.where(row_ok[:, None] & valid[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        v = _load_rows(V, cols, col_ok, s_vn, s_vd, D, BLOCK_D)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(qa.dtype)
        dqa += tl.dot(ds, ka, input_precision=PREC)
        dqb += tl.dot(ds, kb, input_precision=PREC)
    return dqa, dqb


@triton.jit
def _attn_bwd_dq_kernel(
    Q, QW, QF, DO, LSE, DELTA, DQ, DQW,
    K1, V1, K1W, K1F, MASK1, K2, V2, K2W, K2F,
    H, N_q, N1, N2, lse_offset, N_total, sm_scale, eps, HALF, D, n_blocks,
    s_qb, s_qh, s_qn, s_qd, s_qfb, s_qfn, s_ob, s_oh, s_on, s_od, s_gb, s_gh, s_gn, s_gd,
    s_k1b, s_k1h, s_k1n, s_k1d, s_v1b, s_v1h, s_v1n, s_v1d, s_k1fb, s_k1fn, s_m1b,
    s_k2b, s_k2h, s_k2n, s_k2d, s_v2b, s_v2h, s_v2n, s_v2d, s_k2fb, s_k2fn,
    Q_NORM: tl.constexpr, Q_ROPE: tl.constexpr, K1_NORM: tl.constexpr, K1_ROPE: tl.constexpr,
    HAS_MASK1: tl.constexpr, K2_NORM: tl.constexpr, K2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
):
    """dq of BLOCK_M queries of one stream (do: (B, N_q, H, d) strides s_o*; dq strides s_g*).
    ALL_VALID1/2: no masked key or query row against key stream 1/2."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_q
    qf = QF + b * s_qfb
    xa, xb = _load_pairs(Q + b * s_qb + h * s_qh, rows, row_ok, s_qn, s_qd, HALF, INTERLEAVED, BLOCK_HALF)
    qa, qb = _norm_rope(xa, xb, QW, qf, rows, row_ok, s_qfn, HALF, eps, Q_NORM, Q_ROPE, INTERLEAVED, BLOCK_HALF)
    qa = qa.to(Q.dtype.element_ty)
    qb = qb.to(Q.dtype.element_ty)
    do = _load_rows(DO + b * s_ob + h * s_oh, rows, row_ok, s_on, s_od, D, BLOCK_D)
    at = bh.to(tl.int64) * N_total + lse_offset + rows
    lse2 = tl.load(LSE + at, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + at, mask=row_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dqa = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    dqa, dqb = _dq_kv_stream(dqa, dqb, qa, qb, do, lse2, delta, K1 + b * s_k1b + h * s_k1h,
                             V1 + b * s_v1b + h * s_v1h, K1W, K1F + b * s_k1fb, MASK1, b, N1, s_k1n, s_k1d,
                             s_v1n, s_v1d, s_k1fn, s_m1b, qk_scale, eps, HALF, D, row_ok, HAS_MASK1, K1_NORM,
                             K1_ROPE, INTERLEAVED, BLOCK_N, BLOCK_HALF, BLOCK_D, PREC, ALL_VALID1)
    dqa, dqb = _dq_kv_stream(dqa, dqb, qa, qb, do, lse2, delta, K2 + b * s_k2b + h * s_k2h,
                             V2 + b * s_v2b + h * s_v2h, K2W, K2F + b * s_k2fb, MASK1, b, N2, s_k2n, s_k2d,
                             s_v2n, s_v2d, s_k2fn, s_m1b, qk_scale, eps, HALF, D, row_ok, False, K2_NORM,
                             K2_ROPE, INTERLEAVED, BLOCK_N, BLOCK_HALF, BLOCK_D, PREC, ALL_VALID2)
    ga, gb, dwa, dwb = _norm_rope_backward(dqa * sm_scale, dqb * sm_scale, xa, xb, QW, qf, rows, row_ok, s_qfn,
                                           HALF, eps, Q_NORM, Q_ROPE, INTERLEAVED, BLOCK_HALF)
    _store_pairs(DQ + b * s_gb + h * s_gh, rows, row_ok, s_gn, s_gd, HALF, ga, gb, INTERLEAVED, BLOCK_HALF)
    if Q_NORM:  # partials (B·H·n_blocks, 2, BLOCK_HALF)
        part = DQW + ((bh.to(tl.int64) * n_blocks + pid_m) * 2) * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
        tl.store(part, dwa)
        tl.store(part + BLOCK_HALF, dwb)


@triton.jit
def _dkdv_q_stream(dka, dkb, dv, ka, kb, v, col_valid, Q, QW, QF, DO, LSE, DELTA, bh, b, N_q, lse_offset,
                   N_total, s_qn, s_qd, s_qfn, s_on, s_od, qk_scale, eps, HALF, D,
                   HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                   ALL_VALID: tl.constexpr):
    """ALL_VALID: every key of the program and every query row of the stream is real."""
    for start in range(0, N_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N_q
        qa, qb = _load_pairs(Q, rows, row_ok, s_qn, s_qd, HALF, INTERLEAVED, BLOCK_HALF)
        qa, qb = _norm_rope(qa, qb, QW, QF, rows, row_ok, s_qfn, HALF, eps, HAS_NORM, HAS_ROPE, INTERLEAVED,
                            BLOCK_HALF)
        qa = qa.to(ka.dtype)
        qb = qb.to(kb.dtype)
        do = _load_rows(DO, rows, row_ok, s_on, s_od, D, BLOCK_D)
        at = bh.to(tl.int64) * N_total + lse_offset + rows
        lse2 = tl.load(LSE + at, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + at, mask=row_ok, other=0.0)
        # transposed scores sT [BLOCK_N, BLOCK_M]: keys of this program × queries of the block
        st = tl.dot(ka, tl.trans(qa), input_precision=PREC) + tl.dot(kb, tl.trans(qb), input_precision=PREC)
        if ALL_VALID:
            pt = tl.exp2(st * qk_scale - lse2[None, :])
        else:
            pt = tl.where(col_valid[:, None] & row_ok[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
        dka += tl.dot(dst, qa, input_precision=PREC)
        dkb += tl.dot(dst, qb, input_precision=PREC)
    return dka, dkb, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    K, V, KW, KF, MASK, DK, DV, DKW,
    Q1, QW1, QF1, DO1, Q2, QW2, QF2, DO2, LSE, DELTA,
    H, N_kv, N1, N2, N_total, sm_scale, eps, HALF, D, n_blocks,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_kfb, s_kfn, s_mb,
    s_gb, s_gh, s_gn, s_gd, s_hb, s_hh, s_hn, s_hd,
    s_q1b, s_q1h, s_q1n, s_q1d, s_q1fb, s_q1fn, s_o1b, s_o1h, s_o1n, s_o1d,
    s_q2b, s_q2h, s_q2n, s_q2d, s_q2fb, s_q2fn, s_o2b, s_o2h, s_o2n, s_o2d,
    K_NORM: tl.constexpr, K_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, Q1_NORM: tl.constexpr,
    Q1_ROPE: tl.constexpr, Q2_NORM: tl.constexpr, Q2_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, ALL_VALID1: tl.constexpr, ALL_VALID2: tl.constexpr,
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
    xa, xb = _load_pairs(K + b * s_kb + h * s_kh, cols, col_ok, s_kn, s_kd, HALF, INTERLEAVED, BLOCK_HALF)
    ka, kb = _norm_rope(xa, xb, KW, kf, cols, col_ok, s_kfn, HALF, eps, K_NORM, K_ROPE, INTERLEAVED, BLOCK_HALF)
    ka = ka.to(K.dtype.element_ty)
    kb = kb.to(K.dtype.element_ty)
    dcols = tl.arange(0, BLOCK_D)
    v = _load_rows(V + b * s_vb + h * s_vh, cols, col_ok, s_vn, s_vd, D, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634
    dka = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dka, dkb, dv = _dkdv_q_stream(dka, dkb, dv, ka, kb, v, col_valid, Q1 + b * s_q1b + h * s_q1h, QW1,
                                  QF1 + b * s_q1fb, DO1 + b * s_o1b + h * s_o1h, LSE, DELTA, bh, b, N1, 0, N_total,
                                  s_q1n, s_q1d, s_q1fn, s_o1n, s_o1d, qk_scale, eps, HALF, D, Q1_NORM, Q1_ROPE,
                                  INTERLEAVED, BLOCK_M, BLOCK_HALF, BLOCK_D, PREC, ALL_VALID1)
    dka, dkb, dv = _dkdv_q_stream(dka, dkb, dv, ka, kb, v, col_valid, Q2 + b * s_q2b + h * s_q2h, QW2,
                                  QF2 + b * s_q2fb, DO2 + b * s_o2b + h * s_o2h, LSE, DELTA, bh, b, N2, N1, N_total,
                                  s_q2n, s_q2d, s_q2fn, s_o2n, s_o2d, qk_scale, eps, HALF, D, Q2_NORM, Q2_ROPE,
                                  INTERLEAVED, BLOCK_M, BLOCK_HALF, BLOCK_D, PREC, ALL_VALID2)
    ga, gb, dwa, dwb = _norm_rope_backward(dka * sm_scale, dkb * sm_scale, xa, xb, KW, kf, cols, col_ok, s_kfn,
                                           HALF, eps, K_NORM, K_ROPE, INTERLEAVED, BLOCK_HALF)
    _store_pairs(DK + b * s_gb + h * s_gh, cols, col_ok, s_gn, s_gd, HALF, ga, gb, INTERLEAVED, BLOCK_HALF)
    tl.store(DV + b * s_hb + h * s_hh + cols[:, None] * s_hn + dcols[None, :] * s_hd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (dcols < D)[None, :])
    if K_NORM:
        part = DKW + ((bh.to(tl.int64) * n_blocks + pid_n) * 2) * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
        tl.store(part, dwa)
        tl.store(part + BLOCK_HALF, dwb)


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
            num_warps: Optional[int], num_stages: Optional[int], backward: bool):
    """Tiles and launch options: (BLOCK_M, BLOCK_N, BLOCK_HALF, BLOCK_D, warps, stages). GPU defaults for
    16-bit inputs from benchmarks/tune_attention.py on an H100 (2026-11-22): forward 128 × 128 (8 warps,
    3 stages), backward 64 × 64 (4 warps, 2 stages). fp32 inputs (exact "ieee" dots, no tensor cores; a
    correctness path) take a quarter of the area: at the 16-bit tiles they overflow shared memory, and each
    fallback step of a refused launch is another slow compile. 16 × 16 in the interpreter."""
    interpret = device.type != "cuda"
    wide = dtype == torch.float32
    if interpret:
        default_m = default_n = 16
        warps, stages = 4, 1
    elif backward:
        default_m, default_n = (32, 32) if wide else (64, 64)
        warps, stages = 4, (1 if wide else 2)
    else:
        default_m, default_n = (64, 64) if wide else (128, 128)
        warps, stages = (4, 2) if wide else (8, 3)
    return (block_m or default_m, block_n or default_n, _utils.next_pow2(max(d // 2, 8)),
            _utils.next_pow2(max(d, 16)), num_warps or warps, num_stages or stages)


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


def _pairing(interleaved: bool, txt: Stream, img: Stream) -> bool:
    """Without RoPE the pairing of channels is free: take the two contiguous halves (the cheaper loads)."""
    return interleaved and (txt.freqs is not None or img.freqs is not None)


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
    interleaved = _pairing(interleaved, txt, img)
    BM, BN, BH, BD, warps, stages = _config(d, img.q.dtype, dev, block_m, block_n, num_warps, num_stages,
                                            backward=False)
    o_img = _utils.new_empty((B, N_img, H, d), img.q.dtype, dev)
    o_txt = _utils.new_empty((B, N_txt, H, d), img.q.dtype, dev)
    lse = _utils.new_empty((B, H, N), torch.float32, dev)
    mask = txt.mask if txt.mask is not None else img.q
    k1f, s_k1fb, s_k1fn = txt.freq_args()
    k2f, s_k2fb, s_k2fn = img.freq_args()
    for q_stream, out, offset in ((txt, o_txt, 0), (img, o_img, N_txt)):
        if q_stream.n == 0:
            continue
        qf, s_qfb, s_qfn = q_stream.freq_args()
        launch = lambda BM, BN, warps, stages, **kw: _attn_fwd_kernel[(triton.cdiv(q_stream.n, BM), B * H)](  # noqa
            **kw, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
            ALL_VALID1=txt.mask is None and N_txt % BN == 0, ALL_VALID2=N_img % BN == 0)
        _with_fallback(launch, (BM, BN, warps, stages), explicit=block_m is not None or block_n is not None,
                       kwargs=dict(
            Q=q_stream.q, QW=q_stream.q_weight if q_stream.q_weight is not None else q_stream.q, QF=qf, OUT=out,
            LSE=lse, K1=txt.k, V1=txt.v, K1W=txt.k_weight if txt.k_weight is not None else txt.k, K1F=k1f,
            MASK1=mask, K2=img.k, V2=img.v, K2W=img.k_weight if img.k_weight is not None else img.k, K2F=k2f,
            H=H, N_q=q_stream.n, N1=N_txt, N2=N_img, lse_offset=offset, N_total=N, sm_scale=sm_scale, eps=eps,
            HALF=d // 2, D=d, **_stride_kwargs(
                "s_qb s_qh s_qn s_qd s_qfb s_qfn s_ob s_oh s_on s_od s_k1b s_k1h s_k1n s_k1d s_v1b s_v1h s_v1n s_v1d "
                "s_k1fb s_k1fn s_m1b s_k2b s_k2h s_k2n s_k2d s_v2b s_v2h s_v2n s_v2d s_k2fb s_k2fn",
                *_bhnd(q_stream.q), s_qfb, s_qfn, *_bhnd(out),
                *_bhnd(txt.k), *_bhnd(txt.v), s_k1fb, s_k1fn, mask.stride(0) if txt.mask is not None else 0,
                *_bhnd(img.k), *_bhnd(img.v), s_k2fb, s_k2fn),
            Q_NORM=q_stream.q_weight is not None, Q_ROPE=q_stream.freqs is not None,
            K1_NORM=txt.k_weight is not None, K1_ROPE=txt.freqs is not None, HAS_MASK1=txt.mask is not None,
            K2_NORM=img.k_weight is not None, K2_ROPE=img.freqs is not None, INTERLEAVED=interleaved,
            BLOCK_HALF=BH, BLOCK_D=BD, PREC=_prec(img.q.dtype)))
    return o_img, o_txt, lse


def _pairs_to_channels(part_sum: torch.Tensor, d: int, interleaved: bool) -> torch.Tensor:
    """(2, BLOCK_HALF) pair-channel sums -> (d,) in the weight's channel order."""
    half = d // 2
    a, b = part_sum[0, :half], part_sum[1, :half]
    if interleaved:
        return torch.stack([a, b], dim=-1).reshape(d)
    return torch.cat([a, b])


def attention_bwd(do_img: torch.Tensor, do_txt: torch.Tensor, txt: Stream, img: Stream, o_img: torch.Tensor,
                  o_txt: torch.Tensor, lse: torch.Tensor, sm_scale: float, eps: float, interleaved: bool, *,
                  block_m: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
                  num_stages: Optional[int] = None):
    """Backward. Returns a dict with dq/dk/dv of each stream ("dq_img", …, "dv_txt") and, where the stream
    has norm weights, their gradients ("dq_weight_img", "dk_weight_img", "dq_weight_txt", "dk_weight_txt")
    as fp32 (d,) sums in a fixed order."""
    B, N_img, H, d = img.q.shape
    N_txt = txt.n
    N = N_txt + N_img
    dev = img.q.device
    interleaved = _pairing(interleaved, txt, img)
    BM, BN, BH, BD, warps, stages = _config(d, img.q.dtype, dev, block_m, block_n, num_warps, num_stages,
                                            backward=True)
    explicit = block_m is not None or block_n is not None  # asked-for tiles are not silently replaced
    # delta_i = rowsum(dO ∘ O), fp32 (B, H, N) with text positions first
    delta = torch.cat([(do_txt.float() * o_txt.float()).sum(-1), (do_img.float() * o_img.float()).sum(-1)], 1)
    delta = delta.transpose(1, 2).contiguous()
    mask = txt.mask if txt.mask is not None else img.q
    s_mb = mask.stride(0) if txt.mask is not None else 0
    k1f, s_k1fb, s_k1fn = txt.freq_args()
    k2f, s_k2fb, s_k2fn = img.freq_args()
    grads = {}
    prec = _prec(img.q.dtype)
    for name, q_stream, do in (("txt", txt, do_txt), ("img", img, do_img)):
        dq = _utils.new_empty(tuple(q_stream.q.shape), q_stream.q.dtype, dev)
        grads["dq_" + name] = dq
        if q_stream.n == 0:
            if q_stream.q_weight is not None:
                grads["dq_weight_" + name] = torch.zeros(d, device=dev, dtype=torch.float32)
            continue
        qf, s_qfb, s_qfn = q_stream.freq_args()

        def launch_dq(block_m, block_n, warps, stages):
            n_blocks = triton.cdiv(q_stream.n, block_m)
            rows_full = q_stream.n % block_m == 0
            part = (torch.empty((B * H * n_blocks, 2, BH), device=dev, dtype=torch.float32)
                    if q_stream.q_weight is not None else dq)
            _attn_bwd_dq_kernel[(n_blocks, B * H)](
                q_stream.q, q_stream.q_weight if q_stream.q_weight is not None else q_stream.q, qf, do, lse, delta,
                dq, part, txt.k, txt.v, txt.k_weight if txt.k_weight is not None else txt.k, k1f, mask,
                img.k, img.v, img.k_weight if img.k_weight is not None else img.k, k2f,
                H, q_stream.n, N_txt, N_img, 0 if name == "txt" else N_txt, N, sm_scale, eps, d // 2, d, n_blocks,
                *_bhnd(q_stream.q), s_qfb, s_qfn, *_bhnd(do), *_bhnd(dq),
                *_bhnd(txt.k), *_bhnd(txt.v), s_k1fb, s_k1fn, s_mb, *_bhnd(img.k), *_bhnd(img.v), s_k2fb, s_k2fn,
                Q_NORM=q_stream.q_weight is not None, Q_ROPE=q_stream.freqs is not None,
                K1_NORM=txt.k_weight is not None, K1_ROPE=txt.freqs is not None, HAS_MASK1=txt.mask is not None,
                K2_NORM=img.k_weight is not None, K2_ROPE=img.freqs is not None, INTERLEAVED=interleaved,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_HALF=BH, BLOCK_D=BD, PREC=prec, num_warps=warps,
                num_stages=stages, ALL_VALID1=rows_full and txt.mask is None and N_txt % block_n == 0,
                ALL_VALID2=rows_full and N_img % block_n == 0)
            return part

        part = _with_fallback(launch_dq, (BM, BN, warps, stages), explicit, {})
        if q_stream.q_weight is not None:
            grads["dq_weight_" + name] = _pairs_to_channels(part.sum(0), d, interleaved)
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
            n_blocks = triton.cdiv(kv.n, block_n)
            keys_full = not kv_mask and kv.n % block_n == 0
            part = (torch.empty((B * H * n_blocks, 2, BH), device=dev, dtype=torch.float32)
                    if kv.k_weight is not None else dk)
            _attn_bwd_dkdv_kernel[(n_blocks, B * H)](
                kv.k, kv.v, kv.k_weight if kv.k_weight is not None else kv.k, kf, kv.mask if kv_mask else kv.k,
                dk, dv, part,
                txt.q, txt.q_weight if txt.q_weight is not None else txt.q, q1f, do_txt,
                img.q, img.q_weight if img.q_weight is not None else img.q, q2f, do_img, lse, delta,
                H, kv.n, N_txt, N_img, N, sm_scale, eps, d // 2, d, n_blocks,
                *_bhnd(kv.k), *_bhnd(kv.v), s_kfb, s_kfn, kv.mask.stride(0) if kv_mask else 0,
                *_bhnd(dk), *_bhnd(dv),
                *_bhnd(txt.q), s_q1fb, s_q1fn, *_bhnd(do_txt), *_bhnd(img.q), s_q2fb, s_q2fn, *_bhnd(do_img),
                K_NORM=kv.k_weight is not None, K_ROPE=kv.freqs is not None, HAS_MASK=kv_mask,
                Q1_NORM=txt.q_weight is not None, Q1_ROPE=txt.freqs is not None,
                Q2_NORM=img.q_weight is not None, Q2_ROPE=img.freqs is not None, INTERLEAVED=interleaved,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_HALF=BH, BLOCK_D=BD, PREC=prec, num_warps=warps,
                num_stages=stages, ALL_VALID1=keys_full and N_txt % block_m == 0,
                ALL_VALID2=keys_full and N_img % block_m == 0)
            return part

        part = _with_fallback(launch_dkdv, (BM, BN, warps, stages), explicit, {})
        if kv.k_weight is not None:
            grads["dk_weight_" + name] = _pairs_to_channels(part.sum(0), d, interleaved)
    return grads

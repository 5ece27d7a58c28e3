"""Fused AdaLN modulation: LayerNorm (no affine) + per-sample or per-token scale/shift, optionally with
the gated residual in front of it (the seam between two DiT sublayers).

    plain:  out = LN(x) * (1 + scale) + shift
    gated:  x' = x + gate * y  (stored in x's dtype);  out = LN(x') * (1 + scale) + shift

Forward: one read of each input row, one write of each output row, plus fp32 mean and 1/std per row
(M floats) for the backward. Backward: dx (and dy for the gated form) row by row; the per-sample
dshift/dscale/dgate are sums over tokens, accumulated in fp32 per chunk of rows and then summed over
chunks in a fixed order by a second small kernel — deterministic, no atomics.

Shapes: x, y (B, N, D) with any strides; shift/scale/gate (B, D) or (B, N, D) with any strides;
outputs are contiguous. Any D up to ``MAX_D``; any N ≥ 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils
from fastdit.kernels._utils import fp8_grid_rtne, to_dtype_rtne

MAX_D = 16384


@triton.jit
def _fwd_load(X, RES, GATE, SHIFT, SCALE, rows, row_ok, N, cols, col_ok,
              s_xb, s_xn, s_xd, s_rb, s_rn, s_rd, s_gb, s_gn, s_gd, s_hb, s_hn, s_hd, s_cb, s_cn, s_cd,
              GATED: tl.constexpr):
    """Raw loads of one block of rows (what the next step needs, issued a step early)."""
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // N
    n = rows - b * N
    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols * s_xd, mask=mask, other=0.0)
    shift = tl.load(SHIFT + (b * s_hb + n * s_hn)[:, None] + cols * s_hd, mask=mask, other=0.0)
    scale = tl.load(SCALE + (b * s_cb + n * s_cn)[:, None] + cols * s_cd, mask=mask, other=0.0)
    r = x
    g = shift
    if GATED:
        r = tl.load(RES + (b * s_rb + n * s_rn)[:, None] + cols * s_rd, mask=mask, other=0.0)
        g = tl.load(GATE + (b * s_gb + n * s_gn)[:, None] + cols * s_gd, mask=mask, other=0.0)
    return x, r, g, shift, scale


@triton.jit
def _fwd_residual(x, r, g, XNEW, out_offs, mask, GATED: tl.constexpr):
    """fp32 row piece to normalise: x, or for the gated form x' = x + g*r (stored, and normalised as
    stored so that out == LN-modulate(x'))."""
    x = x.to(tl.float32)
    if GATED:
        x_new = to_dtype_rtne(x + g.to(tl.float32) * r.to(tl.float32), XNEW.dtype.element_ty)
        tl.store(XNEW + out_offs, x_new, mask=mask)
        x = x_new.to(tl.float32)
    return x


@triton.jit
def _fwd_modulate_store(OUT, out_offs, mask, xc, rstd, shift, scale):
    """Store the modulated row piece in OUT's dtype; returns it as stored, in fp32 (what FP8 quantises)."""
    out = xc * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    out = to_dtype_rtne(out, OUT.dtype.element_ty)
    tl.store(OUT + out_offs, out, mask=mask)
    return tl.where(mask, out.to(tl.float32), 0.0)


@triton.jit
def _fwd_quantize_store(OUTQ, out_offs, mask, y, qscale, Q_MANT: tl.constexpr, Q_MIN_EXP: tl.constexpr,
                        Q_FMAX: tl.constexpr):
    """y / qscale (IEEE division), saturated to the fp8 range, rounded to nearest even, stored as fp8."""
    q = tl.math.div_rn(y, qscale[:, None])
    q = tl.minimum(tl.maximum(q, -Q_FMAX), Q_FMAX)
    tl.store(OUTQ + out_offs, fp8_grid_rtne(q, Q_MANT, Q_MIN_EXP).to(OUTQ.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_fwd_kernel(
    X, RES, GATE, SHIFT, SCALE,
    OUT, XNEW, MEAN, RSTD, OUTQ, QSCALE,
    M, N, D, eps,
    s_xb, s_xn, s_xd, s_rb, s_rn, s_rd, s_gb, s_gn, s_gd,
    s_hb, s_hn, s_hd, s_cb, s_cn, s_cd,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr,
    HAS_TAIL: tl.constexpr, BLOCK_T: tl.constexpr,
    QUANT: tl.constexpr, Q_MANT: tl.constexpr, Q_MIN_EXP: tl.constexpr, Q_FMAX: tl.constexpr,
    Q_AMAX_EPS: tl.constexpr,
):
    """Program p normalises rows [p * BLOCK_M * STEPS, …) in STEPS blocks of BLOCK_M rows, loading
    each block while the previous one is being computed and stored.

    A row is held as a head piece of BLOCK_D columns and, with HAS_TAIL, a tail piece of BLOCK_T
    columns after it: D = 1152 as 1024 + 128 instead of one 2048-wide tile, of which 44% would be
    masked lanes that still cost instructions (the profile of the one-piece kernel at D = 1152 showed
    it issue-bound: SM throughput 78%, DRAM 46%).

    QUANT: also store each output row quantised to fp8 (OUTQ) with its scale (QSCALE, fp32 per row):
    scale = max(amax, Q_AMAX_EPS) / Q_FMAX over the row as stored in OUT's dtype, data = that row / scale,
    saturated, rounded to nearest even -- fastdit.ops.fp8_linear.quantize_rows of OUT, bit for bit, with no
    second pass over it (the FP8 GEMM's row-scaled input, issue 16)."""
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < D
    cols = offs_d.to(tl.int64)[None, :]
    rows = tl.program_id(0).to(tl.int64) * (BLOCK_M * STEPS) + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    nxt = _fwd_load(X, RES, GATE, SHIFT, SCALE, rows, row_ok, N, cols, col_ok, s_xb, s_xn, s_xd, s_rb, s_rn, s_rd,
                    s_gb, s_gn, s_gd, s_hb, s_hn, s_hd, s_cb, s_cn, s_cd, GATED)
    if HAS_TAIL:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
        tcol_ok = offs_t < D
        tcols = offs_t.to(tl.int64)[None, :]
        nxt_t = _fwd_load(X, RES, GATE, SHIFT, SCALE, rows, row_ok, N, tcols, tcol_ok, s_xb, s_xn, s_xd,
                          s_rb, s_rn, s_rd, s_gb, s_gn, s_gd, s_hb, s_hn, s_hd, s_cb, s_cn, s_cd, GATED)
    for step in range(STEPS):
        x, r, g, shift, scale = nxt
        if HAS_TAIL:
            xt, rt, gt, shift_t, scale_t = nxt_t
        cur_rows, cur_ok = rows, row_ok
        rows += BLOCK_M
        row_ok = (rows < M) & (step + 1 < STEPS)
        nxt = _fwd_load(X, RES, GATE, SHIFT, SCALE, rows, row_ok, N, cols, col_ok, s_xb, s_xn, s_xd,
                        s_rb, s_rn, s_rd, s_gb, s_gn, s_gd, s_hb, s_hn, s_hd, s_cb, s_cn, s_cd, GATED)
        if HAS_TAIL:
            nxt_t = _fwd_load(X, RES, GATE, SHIFT, SCALE, rows, row_ok, N, tcols, tcol_ok, s_xb, s_xn, s_xd,
                              s_rb, s_rn, s_rd, s_gb, s_gn, s_gd, s_hb, s_hn, s_hd, s_cb, s_cn, s_cd, GATED)
        mask = cur_ok[:, None] & col_ok[None, :]
        out_offs = cur_rows[:, None] * D + cols
        x = _fwd_residual(x, r, g, XNEW, out_offs, mask, GATED)
        row_sum = tl.sum(x, axis=1)
        if HAS_TAIL:
            tmask = cur_ok[:, None] & tcol_ok[None, :]
            tout_offs = cur_rows[:, None] * D + tcols
            xt = _fwd_residual(xt, rt, gt, XNEW, tout_offs, tmask, GATED)
            row_sum += tl.sum(xt, axis=1)
        mean = row_sum / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        sq_sum = tl.sum(xc * xc, axis=1)
        if HAS_TAIL:
            xct = tl.where(tmask, xt - mean[:, None], 0.0)
            sq_sum += tl.sum(xct * xct, axis=1)
        rstd = tl.rsqrt(sq_sum / D + eps)
        y = _fwd_modulate_store(OUT, out_offs, mask, xc, rstd, shift, scale)
        if HAS_TAIL:
            yt = _fwd_modulate_store(OUT, tout_offs, tmask, xct, rstd, shift_t, scale_t)
        if QUANT:
            amax = tl.max(tl.abs(y), axis=1)
            if HAS_TAIL:
                amax = tl.maximum(amax, tl.max(tl.abs(yt), axis=1))
            qscale = tl.math.div_rn(tl.maximum(amax, Q_AMAX_EPS), Q_FMAX)
            _fwd_quantize_store(OUTQ, out_offs, mask, y, qscale, Q_MANT, Q_MIN_EXP, Q_FMAX)
            if HAS_TAIL:
                _fwd_quantize_store(OUTQ, tout_offs, tmask, yt, qscale, Q_MANT, Q_MIN_EXP, Q_FMAX)
            tl.store(QSCALE + cur_rows, qscale, mask=cur_ok)
        tl.store(MEAN + cur_rows, mean, mask=cur_ok)
        tl.store(RSTD + cur_rows, rstd, mask=cur_ok)


@triton.jit
def _bwd_load(DOUT, DXNEW, X, RES, GATE, SCALE, MEAN, RSTD, b, n, row_ok, N, cols, col_ok,
              s_ob, s_on, s_od, s_nb, s_nn, s_nd, s_xb, s_xn, s_xd, s_rb, s_rn, s_rd,
              s_gb, s_gn, s_gd, s_cb, s_cn, s_cd, GATED: tl.constexpr, PER_TOKEN: tl.constexpr):
    """Raw loads of one block of rows of sample b (issued a step before they are used)."""
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b * N + n
    dout = tl.load(DOUT + (b * s_ob + n * s_on)[:, None] + cols * s_od, mask=mask, other=0.0)
    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols * s_xd, mask=mask, other=0.0)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    dxn = dout
    r = dout
    scale = dout
    gate = dout
    if GATED:
        dxn = tl.load(DXNEW + (b * s_nb + n * s_nn)[:, None] + cols * s_nd, mask=mask, other=0.0)
        r = tl.load(RES + (b * s_rb + n * s_rn)[:, None] + cols * s_rd, mask=mask, other=0.0)
    if PER_TOKEN:
        scale = tl.load(SCALE + (b * s_cb + n * s_cn)[:, None] + cols * s_cd, mask=mask, other=0.0)
        if GATED:
            gate = tl.load(GATE + (b * s_gb + n * s_gn)[:, None] + cols * s_gd, mask=mask, other=0.0)
    return dout, x, mean, rstd, dxn, r, scale, gate


@triton.jit
def _adaln_bwd_kernel(
    DOUT, DXNEW, X, RES, GATE, SCALE, MEAN, RSTD,
    DX, DRES, DGATE, DSHIFT, DSCALE,
    N, D, rows_per_chunk, n_chunks,
    s_ob, s_on, s_od, s_nb, s_nn, s_nd, s_xb, s_xn, s_xd, s_rb, s_rn, s_rd,
    s_gb, s_gn, s_gd, s_cb, s_cn, s_cd,
    GATED: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, chunk) handles tokens [chunk*rows_per_chunk, …) of sample b, loading each block of
    BLOCK_M rows one step ahead. Per-sample modulation gradients go to fp32 partials[k, b, chunk, :]
    (k = shift, scale, gate); per-token ones are stored directly."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_begin = chunk * rows_per_chunk
    n_end = tl.minimum(n_begin + rows_per_chunk, N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < D
    cols = offs_d.to(tl.int64)[None, :]
    if not PER_TOKEN:  # the sample's modulation row, loaded once
        scale_row = tl.load(SCALE + b * s_cb + cols * s_cd, mask=col_ok[None, :], other=0.0).to(tl.float32)
        gate_row = scale_row
        if GATED:
            gate_row = tl.load(GATE + b * s_gb + cols * s_gd, mask=col_ok[None, :], other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    n = (n_begin + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = n < n_end
    nxt = _bwd_load(DOUT, DXNEW, X, RES, GATE, SCALE, MEAN, RSTD, b, n, row_ok, N, cols, col_ok,
                    s_ob, s_on, s_od, s_nb, s_nn, s_nd, s_xb, s_xn, s_xd, s_rb, s_rn, s_rd,
                    s_gb, s_gn, s_gd, s_cb, s_cn, s_cd, GATED, PER_TOKEN)
    for _ in range(n_begin, n_end, BLOCK_M):
        dout, x, mean, rstd, dxn, r, scale, gate = nxt
        cur_n, cur_ok = n, row_ok
        n += BLOCK_M
        row_ok = n < n_end
        nxt = _bwd_load(DOUT, DXNEW, X, RES, GATE, SCALE, MEAN, RSTD, b, n, row_ok, N, cols, col_ok,
                        s_ob, s_on, s_od, s_nb, s_nn, s_nd, s_xb, s_xn, s_xd, s_rb, s_rn, s_rd,
                        s_gb, s_gn, s_gd, s_cb, s_cn, s_cd, GATED, PER_TOKEN)
        mask = cur_ok[:, None] & col_ok[None, :]
        out_offs = (b * N + cur_n)[:, None] * D + cols
        dout = dout.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if PER_TOKEN:
            scale = scale.to(tl.float32)
        else:
            scale = scale_row
        g = dout * (1.0 + scale)
        mean_g = tl.sum(g, axis=1) / D
        mean_gx = tl.sum(g * xhat, axis=1) / D
        dx = tl.where(mask, rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]), 0.0)
        if GATED:
            dx += dxn.to(tl.float32)
            r = r.to(tl.float32)
            if PER_TOKEN:
                gate = gate.to(tl.float32)
            else:
                gate = gate_row
            tl.store(DRES + out_offs, to_dtype_rtne(gate * dx, DRES.dtype.element_ty), mask=mask)
        tl.store(DX + out_offs, to_dtype_rtne(dx, DX.dtype.element_ty), mask=mask)
        if PER_TOKEN:
            tl.store(DSHIFT + out_offs, to_dtype_rtne(dout, DSHIFT.dtype.element_ty), mask=mask)
            tl.store(DSCALE + out_offs, to_dtype_rtne(dout * xhat, DSCALE.dtype.element_ty), mask=mask)
            if GATED:
                tl.store(DGATE + out_offs, to_dtype_rtne(r * dx, DGATE.dtype.element_ty), mask=mask)
        else:
            acc_shift += tl.sum(dout, axis=0)
            acc_scale += tl.sum(dout * xhat, axis=0)
            if GATED:
                acc_gate += tl.sum(r * dx, axis=0)
    if not PER_TOKEN:
        # partials: (K, B, n_chunks, D) fp32, K = 2 (shift, scale) or 3 (+ gate); DSHIFT is its base
        plane = tl.num_programs(0).to(tl.int64) * n_chunks * D
        at = (b * n_chunks + chunk) * D + offs_d
        tl.store(DSHIFT + at, acc_shift, mask=col_ok)
        tl.store(DSHIFT + plane + at, acc_scale, mask=col_ok)
        if GATED:
            tl.store(DSHIFT + 2 * plane + at, acc_gate, mask=col_ok)


# ------------------------------------------------------------------------------------------ launchers

def _mod_strides(t: torch.Tensor):
    """(stride_b, stride_n, stride_d) of a (B, D) or (B, N, D) modulation tensor; 0 over tokens for (B, D)."""
    if t.dim() == 2:
        return t.stride(0), 0, t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def row_pieces(D: int, split: Optional[bool] = None):
    """(head, tail) widths of the tiles that hold a row of D: one power-of-two tile (tail 0), or the largest
    power of two ≤ D plus a power-of-two tail for the rest when that masks fewer lanes
    (1152 = 1024 + 128, 3072 = 2048 + 1024, 72 = 64 + 8; 123 stays one 128 tile)."""
    single = _utils.next_pow2(D)
    head = single // 2 if single > D else single
    tail = _utils.next_pow2(D - head) if D > head else 0
    if split is None:
        split = tail > 0 and head + tail < single
    return (head, tail) if split and tail > 0 else (single, 0)


def _fwd_config(D: int, gated: bool, block_m: Optional[int], num_warps: Optional[int], steps: Optional[int],
                split: Optional[bool] = None):
    """Defaults from benchmarks/tune_kernels.py on an H100 (2026-11-22,
    benchmarks/results/archive/2026-11-22_h100_kernels_tuning/2026-11-22_h100_tune_adaln_fwd.json).
    The row is held as two power-of-two tiles when that masks fewer lanes (:func:`row_pieces`; won at
    every tuned shape, by 4-30%). For D ≥ 1024 one row per program, with about 24 columns per thread:
    2 warps up to 2048 held columns (D = 1152, 1536), 4 up to 4096 (3072), then 8 and 16. Several rows
    per program for small D. More row blocks per program (``steps``), also with the modulation loaded once
    per program for per-sample rows, never won: 1."""
    block_d, block_t = row_pieces(D, split)
    held = block_d + block_t
    block_m = block_m or max(1, min(16, 1024 // _utils.next_pow2(D)))
    if num_warps is None:
        if block_m > 1:
            num_warps = 4
        else:
            num_warps = 2 if held <= 2048 else 4 if held <= 4096 else 8 if held <= 8192 else 16
    return block_m, block_d, block_t, num_warps, steps or 1


# (mantissa bits, exponent of the smallest normal) of the fp8 formats the forward can emit
FP8_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


def adaln_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
              res: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None, *,
              quantize: Optional[torch.dtype] = None, amax_eps: float = 1e-12,
              block_m: Optional[int] = None, num_warps: Optional[int] = None, steps: Optional[int] = None,
              split: Optional[bool] = None):
    """LN-modulate forward. Without ``res``/``gate``: returns (out, mean, rstd). With them (the gated
    residual): returns (x_new, out, mean, rstd). mean/rstd are fp32 (B, N). ``quantize`` (an fp8 dtype
    of :data:`FP8_FORMATS`): also returns out quantised per row -- (..., out_q (B, N, D) in that dtype,
    q_scale fp32 (B, N, 1)) appended -- see the kernel's docstring. ``block_m`` (rows per step),
    ``steps`` (row blocks per program), ``num_warps`` and ``split`` (row as two tiles, see
    :func:`row_pieces`) override the heuristics (for tuning and tests)."""
    B, N, D = x.shape
    assert D <= MAX_D, f"D = {D} > {MAX_D}"
    assert quantize is None or quantize in FP8_FORMATS, f"quantize must be one of {list(FP8_FORMATS)}"
    gated = res is not None
    M = B * N
    out = _utils.new_empty((B, N, D), x.dtype, x.device)
    x_new = _utils.new_empty((B, N, D), x.dtype, x.device) if gated else out
    mean = _utils.new_empty((B, N), torch.float32, x.device)
    rstd = _utils.new_empty((B, N), torch.float32, x.device)
    if quantize is not None:
        out_q = _utils.new_empty((B, N, D), torch.float32, x.device).to(quantize) if _utils.POISON_OUTPUTS \
            else torch.empty((B, N, D), dtype=quantize, device=x.device)
        q_scale = _utils.new_empty((B, N, 1), torch.float32, x.device)
        q_mant, q_min_exp = FP8_FORMATS[quantize]
        q_fmax = torch.finfo(quantize).max
    else:
        out_q, q_scale, q_mant, q_min_exp, q_fmax = out, mean, 3, -6, 448.0
    block_m, block_d, block_t, warps, steps = _fwd_config(D, res is not None, block_m, num_warps, steps, split)
    r, g = (res, gate) if gated else (x, shift)
    r_strides = r.stride() if gated else (0, 0, 0)
    g_strides = _mod_strides(g) if gated else (0, 0, 0)
    if M > 0:
        _utils.launcher(_adaln_fwd_kernel, out)[(_utils.cdiv(M, block_m * steps),)](
            x, r, g, shift, scale, out, x_new, mean, rstd, out_q, q_scale, M, N, D, eps,
            *x.stride(), *r_strides, *g_strides, *_mod_strides(shift), *_mod_strides(scale),
            GATED=gated, BLOCK_M=block_m, BLOCK_D=block_d, STEPS=steps, HAS_TAIL=block_t > 0,
            BLOCK_T=max(block_t, 1), QUANT=quantize is not None, Q_MANT=q_mant, Q_MIN_EXP=q_min_exp,
            Q_FMAX=q_fmax, Q_AMAX_EPS=amax_eps, num_warps=warps)
    outputs = (x_new, out, mean, rstd) if gated else (out, mean, rstd)
    return outputs + (out_q, q_scale) if quantize is not None else outputs


def _bwd_config(B: int, N: int, D: int, device: torch.device, programs_per_sm: int, min_rows: int,
                block_m: Optional[int], num_warps: Optional[int]):
    """Chunking of each sample's tokens: enough programs to fill the GPU (``programs_per_sm``), but at
    least ``min_rows`` rows each, since every chunk adds a row of fp32 partials per reduced tensor.
    Defaults from benchmarks/tune_kernels.py on an H100 (2026-11-22)."""
    block_d = _utils.next_pow2(D)
    block_m = block_m or max(1, min(16, 1024 // block_d))
    target = programs_per_sm * _utils.processor_count(device)
    chunks = max(1, min(_utils.cdiv(N, max(min_rows, block_m)), _utils.cdiv(target, max(B, 1))))
    rows_per_chunk = max(block_m, _utils.cdiv(_utils.cdiv(N, chunks), block_m) * block_m)
    chunks = _utils.cdiv(N, rows_per_chunk)  # 0 when N == 0: nothing to launch, the sums are zero
    return block_m, block_d, chunks, rows_per_chunk, num_warps or _utils.warps_for(block_m * block_d, lo=4)


def adaln_bwd(dout: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, *, res: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None, dx_new: Optional[torch.Tensor] = None,
              programs_per_sm: int = 4, min_rows: Optional[int] = None, block_m: Optional[int] = None,
              num_warps: Optional[int] = None):
    """LN-modulate backward. ``x`` is what was normalised (x' for the gated form).

    Plain: returns (dx, dshift, dscale). Gated (``res``, ``gate``, ``dx_new`` given): returns
    (dx, dres, dgate, dshift, dscale), where dx = dx_new + the LayerNorm path and dres = gate * dx.
    """
    B, N, D = x.shape
    gated = res is not None
    per_token = shift.dim() == 3
    device = x.device
    if min_rows is None:
        min_rows = 64 if gated else 32
    if num_warps is None and _utils.next_pow2(D) >= 1024:
        num_warps = 8 if gated else 4
    block_m, block_d, chunks, rows_per_chunk, warps = _bwd_config(B, N, D, device, programs_per_sm, min_rows,
                                                                  block_m, num_warps)
    dx = _utils.new_empty((B, N, D), x.dtype, device)
    dres = _utils.new_empty((B, N, D), res.dtype, device) if gated else dx
    mods = [shift, scale] + ([gate] if gated else [])
    if per_token:
        grads = [_utils.new_empty((B, N, D), m.dtype, device) for m in mods]
        d_shift, d_scale = grads[0], grads[1]
        d_gate = grads[2] if gated else d_shift
    else:
        partials = _utils.new_empty((len(mods), B, chunks, D), torch.float32, device)
        d_shift = d_scale = d_gate = partials
    n_strides = dx_new.stride() if gated else (0, 0, 0)
    r_strides = res.stride() if gated else (0, 0, 0)
    g_strides = _mod_strides(gate) if gated else (0, 0, 0)
    if B * N > 0:
        _utils.launcher(_adaln_bwd_kernel, dx)[(B, chunks)](
            dout, dx_new if gated else dout, x, res if gated else x, gate if gated else scale, scale, mean, rstd,
            dx, dres, d_gate, d_shift, d_scale, N, D, rows_per_chunk, chunks,
            *dout.stride(), *n_strides, *x.stride(), *r_strides, *g_strides, *_mod_strides(scale),
            GATED=gated, PER_TOKEN=per_token, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    if not per_token:
        grads = [_utils.new_empty((B, D), m.dtype, device) for m in mods]
        _utils.sum_chunks(partials, grads)
    if gated:
        return (dx, dres, grads[2], grads[0], grads[1])
    return (dx, grads[0], grads[1])

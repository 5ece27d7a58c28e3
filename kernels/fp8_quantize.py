"""FP8 quantisation of a matrix along its rows and/or its columns in two passes over it -- what an FP8 GEMM's
backward needs of dY (per row for dX = dY @ W, per column for dW = dY^T @ X) and of X (per column).

    pass 1 (_amax_kernel):      row_amax[r] = max_c |t[r, c]|,  col_amax[c] = max_r |t[r, c]|
                                (per tile, combined with atomic max: max is exact and order-free, so the
                                result does not depend on the order the tiles finish in)
    pass 2 (_quantize_kernel):  rows[r, c]   = q(t[r, c] / row_scale[r])      (R, C) row-major
                                cols_t[c, r] = q(t[r, c] / col_scale[c])      (C, R_pad) row-major: t^T
                                scale = max(amax, eps) / fmax; q = saturate, round to nearest even (fp8 grid)

so ``rows, row_scale == quantize_rows(t)`` and ``cols_t[:, :R], col_scale == quantize_rows(t.t())`` of
fastdit.ops.fp8_linear, bit for bit. ``cols_t`` is the transposed copy an FP8 GEMM takes as its operand reduced
over R; ``R_pad`` (R rounded up to ``pad_to``) columns of it are written, the padding as zeros (cuBLASLt wants
the reduction dimension a multiple of 16). Reading t twice and writing each fp8 copy once (6 bytes per bf16
element for both) replaces a transpose, two amax passes and two casts (about 14).

Shapes: t (R, C) with any strides, float16/bfloat16/float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils
from fastdit.kernels._utils import fp8_grid_rtne

FP8_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def _amax_kernel(T, ROW_AMAX, COL_AMAX, R, C, s_r, s_c,
                 ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok, c_ok = r < R, c < C
    a = tl.abs(tl.load(T + r[:, None] * s_r + c[None, :] * s_c, mask=r_ok[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32))
    if ROWS:
        tl.atomic_max(ROW_AMAX + r, tl.max(a, axis=1), mask=r_ok)
    if COLS:
        tl.atomic_max(COL_AMAX + c, tl.max(a, axis=0), mask=c_ok)


@triton.jit
def _quantize_kernel(T, ROW_AMAX, COL_AMAX, ROWQ, ROW_SCALE, COLQ, COL_SCALE, R, C, R_PAD, s_r, s_c, eps,
                     ROWS: tl.constexpr, COLS: tl.constexpr, R_MANT: tl.constexpr, R_MIN_EXP: tl.constexpr,
                     R_FMAX: tl.constexpr, C_MANT: tl.constexpr, C_MIN_EXP: tl.constexpr, C_FMAX: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok, c_ok = r < R, c < C
    t = tl.load(T + r[:, None] * s_r + c[None, :] * s_c, mask=r_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    if ROWS:
        scale = tl.math.div_rn(tl.maximum(tl.load(ROW_AMAX + r, mask=r_ok, other=0.0), eps), R_FMAX)
        q = tl.math.div_rn(t, scale[:, None])
        q = tl.minimum(tl.maximum(q, -R_FMAX), R_FMAX)
        q = fp8_grid_rtne(q, R_MANT, R_MIN_EXP).to(ROWQ.dtype.element_ty)
        tl.store(ROWQ + r[:, None] * C + c[None, :], q, mask=r_ok[:, None] & c_ok[None, :])
        if pid_c == 0:
            tl.store(ROW_SCALE + r, scale, mask=r_ok)
    if COLS:
        scale = tl.math.div_rn(tl.maximum(tl.load(COL_AMAX + c, mask=c_ok, other=0.0), eps), C_FMAX)
        q = tl.math.div_rn(t, scale[None, :])  # padded rows (r >= R) hold 0 and stay 0
        q = tl.minimum(tl.maximum(q, -C_FMAX), C_FMAX)
        q = fp8_grid_rtne(q, C_MANT, C_MIN_EXP).to(COLQ.dtype.element_ty)
        tl.store(COLQ + c[None, :] * R_PAD + r[:, None], q, mask=(r < R_PAD)[:, None] & c_ok[None, :])
        if pid_r == 0:
            tl.store(COL_SCALE + c, scale, mask=c_ok)


def quantize_rows_cols(t: torch.Tensor, row_dtype: Optional[torch.dtype], col_dtype: Optional[torch.dtype],
                       eps: float, pad_to: int = 1, block_r: int = 64, block_c: int = 64
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
                                  Optional[torch.Tensor]]:
    """(rows (R, C) in ``row_dtype``, row_scale fp32 (R, 1), cols_t (C, R_pad) in ``col_dtype``, col_scale fp32
    (C, 1)); a ``None`` dtype skips that side (its two outputs are None). See the module docstring."""
    assert t.dim() == 2 and (row_dtype is not None or col_dtype is not None)
    assert (row_dtype is None or row_dtype in FP8_FORMATS) and (col_dtype is None or col_dtype in FP8_FORMATS)
    R, C = t.shape
    R_pad = -(-R // pad_to) * pad_to
    device = t.device
    rows_on, cols_on = row_dtype is not None, col_dtype is not None
    row_amax = torch.zeros(R if rows_on else 1, dtype=torch.float32, device=device)
    col_amax = torch.zeros(C if cols_on else 1, dtype=torch.float32, device=device)
    rowq = torch.empty((R, C) if rows_on else (1,), dtype=row_dtype or torch.float8_e4m3fn, device=device)
    colq = torch.empty((C, R_pad) if cols_on else (1,), dtype=col_dtype or torch.float8_e4m3fn, device=device)
    row_scale = _utils.new_empty((R, 1) if rows_on else (1,), torch.float32, device)
    col_scale = _utils.new_empty((C, 1) if cols_on else (1,), torch.float32, device)
    if R * C > 0:
        _utils.launcher(_amax_kernel, row_amax)[(_utils.cdiv(R, block_r), _utils.cdiv(C, block_c))](
            t, row_amax, col_amax, R, C, t.stride(0), t.stride(1), ROWS=rows_on, COLS=cols_on,
            BLOCK_R=block_r, BLOCK_C=block_c)
    if max(R_pad, 1) * C > 0:
        r_mant, r_min = FP8_FORMATS[row_dtype] if rows_on else (3, -6)
        c_mant, c_min = FP8_FORMATS[col_dtype] if cols_on else (3, -6)
        _utils.launcher(_quantize_kernel, row_amax)[(_utils.cdiv(max(R_pad, 1), block_r), _utils.cdiv(C, block_c))](
            t, row_amax, col_amax, rowq, row_scale, colq, col_scale, R, C, R_pad, t.stride(0), t.stride(1), eps,
            ROWS=rows_on, COLS=cols_on, R_MANT=r_mant, R_MIN_EXP=r_min,
            R_FMAX=torch.finfo(row_dtype).max if rows_on else 448.0, C_MANT=c_mant, C_MIN_EXP=c_min,
            C_FMAX=torch.finfo(col_dtype).max if cols_on else 448.0, BLOCK_R=block_r, BLOCK_C=block_c)
    return (rowq if rows_on else None, row_scale if rows_on else None,
            colq if cols_on else None, col_scale if cols_on else None)

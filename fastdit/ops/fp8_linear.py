"""FP8 linear: ``y = x @ weight.T + bias`` computed as FP8 GEMMs, forward and backward -- the GEMM half of the
opt-in FP8 training mode of DiT blocks (qkv, proj, fc1, fc2). Master weights stay in their own dtype (fp32 or
bf16): every call quantises what it multiplies, nothing fp8 is kept between steps.

Shapes: ``x: (..., K)``, ``weight: (N, K)``, ``bias: (N,)`` or None; returns ``(..., N)`` in the autocast dtype
when autocast is on for x's device, else in x's dtype. Gradients come back in the dtypes of x, weight, bias.

**Quantisation** (public, the exact formula: the fused producer kernels, e.g. ``fastdit.ops.adaln_fp8``, emit
the same bits):

    quantize_rows(t (R, C), dtype)  ->  data (R, C) in ``dtype``, scale fp32 (R, 1)
        amax  = max |t| over the row, in fp32 (t.float(): exact for fp16/bf16/fp32)
        scale = max(amax, EPS) / fmax               fp32 division; EPS = 1e-12 (as fp32), fmax = finfo(dtype).max
        data  = clamp(t.float() / scale, -fmax, fmax).to(dtype)
                                                    fp32 division, saturation by the clamp, then torch's cast
                                                    (round to nearest, ties to even)
    quantize_tensor(t, dtype)  ->  the same with one amax over the whole tensor; scale is a 0-d fp32 tensor.

so ``data * scale`` approximates ``t`` (``dequantize``). An all-zero row gets scale EPS / fmax and data 0; a
row whose amax is below EPS quantises towards 0 (its values are divided by EPS / fmax, not by amax / fmax).
The row's max element always lands on ±fmax. e4m3 (fmax 448) keeps 3 mantissa bits (relative rounding
<= 2^-4), e5m2 (fmax 57344) 2 bits (<= 2^-3) and more range.

**Recipes** (:class:`Fp8Recipe`, named presets in :data:`RECIPES`; ``recipe=`` takes either):

    name                 scaling     x, weight   dY (grads)   dW
    "rowwise"            rowwise     e4m3        e4m3         fp8 GEMM
    "rowwise_hp_wgrad"   rowwise     e4m3        e4m3         high precision: dY^T @ X in the output dtype
    "tensorwise"         tensorwise  e4m3        e5m2         fp8 GEMM

Rowwise scaling gives each operand one scale per row *of the GEMM's outer dimension*, i.e. per slice along
the reduction dimension, so the scales factor out of the sums: ``out[i, j] = sa[i] * sb[j] * sum_r a[i, r]
b[r, j]``. Each of the three GEMMs therefore quantises its operands along its own reduction dimension:

    forward  y  = X  @ W^T   (reduce over K): X per row (M rows), W per row (N output channels)
    dgrad    dX = dY @ W     (reduce over N): dY per row (M rows, grad dtype), W per column (K scales)
    wgrad    dW = dY^T @ X   (reduce over M): dY per column (N scales, grad dtype), X per column (K scales)

(X is x flattened to (M, K); tensorwise: one scale per operand, same GEMMs.) Hence the backward needs x in high
precision: its wgrad quantises X per column, which the forward's per-row quantisation cannot give (x is saved
for backward, as weight is). ``"high"`` wgrad: ``dW = dY^T @ X`` with ``torch.mm`` in the output dtype (fp32
accumulation in cuBLAS / oneDNN for bf16), then cast to weight's dtype, as a bf16 autocast ``F.linear``'s
backward does. ``dbias = sum of dY over rows`` in fp32, cast to bias's dtype.

``x_fp8=(data, scale)``: x already quantised per row by a fused producer (exactly ``quantize_rows`` of x as
given, e4m3): data ``(..., K)`` shaped as x or flattened ``(M, K)``, float8_e4m3fn; scale fp32 ``(..., 1)``
or ``(M, 1)`` to match. The forward multiplies it instead of quantising x; x itself is still required (its
shape, output dtype, and the backward's wgrad). Rowwise recipes only.

**Fast path**: ``torch._scaled_mm`` (cuBLASLt / CUTLASS on CUDA; on CPU an fp32-accumulating kernel) with fp32
accumulation and the scales applied in the epilogue; bias fused into the epilogue for bf16/fp16 outputs (as
bias in the output dtype), added after for fp32 outputs. What ``_scaled_mm`` requires (see
:func:`fast_path_reason`): a row-major, b column-major (``wq.t()`` of a contiguous ``wq`` is); fp32 scales,
both rowwise ((rows, 1) and (1, cols), contiguous) or both 0-d; on CUDA compute capability >= 8.9, K and N
multiples of 16, not both operands e5m2, bias not with an fp32 output. The wgrad GEMM reduces over M, which
CUDA would also need to be a multiple of 16: its operands are padded with zero tokens (exact) when it is not.
On CPU (torch 2.13) it accepts any sizes and layouts and fp64/fp32/bf16/fp16 outputs; CPU builds whose
``_scaled_mm`` takes per-tensor scales only (torch 2.11's oneDNN path; probed once) multiply the same fp8 operands
as fp32 (exact products, fp32 sums) and apply the scales after, as the kernel does. Row-wise scaled GEMMs on
CUDA may write bfloat16 only (CUTLASS's f8f8bf16 kernels; probed once per device): other outputs are then
computed in bfloat16 and cast. Eagerly on CUDA (and under Triton's interpreter) the row-wise operands come from
fastdit's quantisation kernel (:mod:`fastdit.kernels.fp8_quantize`: the same bits, dY read for both backward
GEMMs at once, transposed copies written directly).

**Reference** (:func:`fp8_linear_ref`, same signature): the same quantised operands (the same functions
compute them), dequantised to float64 (``data.double() * scale.double()``, exact) and multiplied in float64;
output and gradients cast to the fast op's dtypes. Fast and reference thus differ only in accumulation
precision and order. :func:`fp8_linear_ref_forward` / :func:`fp8_linear_ref_backward` give that math in any
compute dtype, uncast: float64 is the truth the tests use, the output dtype is "the reference computed in low
precision" of the 2x rule (fastdit.testing).

Layers (design.md §3): ``fp8_linear_ref`` (ground truth) · ``fp8_linear`` (the entry with the backend switch;
the fast path is an autograd Function around ATen ops: no Triton kernel and no library op, ``_scaled_mm`` is
one ATen op already).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.ops._common import (check, check_linear_inputs, join_reasons, kernel_can_run, shape_str,
                                 use_triton)

_OP = "fp8_linear"

EPS = 1e-12
"""Lower clamp of amax (as fp32): an all-zero row gets scale EPS / fmax and data 0."""

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
X_DTYPE = torch.float8_e4m3fn  # activations and weights: e4m3 in every recipe
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # dtypes the fast path takes and returns
CUDA_ALIGN = 16  # cuBLASLt FP8 GEMMs: K and N multiples of 16 (the wgrad's M is padded to it)
CUDA_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: Ada (sm_89) and Hopper (sm_90) or newer


# ------------------------------------------------------------------------------------------ quantisation

def _check_fp8_dtype(dtype: torch.dtype) -> None:
    check(dtype in FP8_DTYPES, _OP, lambda: f"fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, "
                                            f"got {dtype}")


def _scale_and_data(t: Tensor, amax: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    fmax = torch.finfo(dtype).max
    # fmax as a tensor on amax's device: CUDA torch divides by a Python scalar as a multiplication by its
    # reciprocal (1/448 is inexact: scales 1 ulp off the IEEE quotient, seen on an H100), by a tensor exactly
    scale = amax.float().clamp(min=EPS) / torch.full((), fmax, dtype=torch.float32, device=amax.device)
    data = (t.float() / scale).clamp(-fmax, fmax).to(dtype)
    return data, scale


def quantize_rows(t: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> Tuple[Tensor, Tensor]:
    """Per-row FP8 quantisation of a 2-D ``t`` (R, C): returns (data (R, C) in ``dtype``, scale fp32 (R, 1)).

    ``scale = max(max|row|, EPS) / finfo(dtype).max`` in fp32, ``data = clamp(t.float() / scale, ±fmax)``
    cast to ``dtype`` (round to nearest even). ``data * scale`` approximates ``t`` (see the module docstring).
    data has t's memory layout (call ``.contiguous()`` for a row-major GEMM operand)."""
    check(isinstance(t, Tensor) and t.dim() == 2, _OP,
          lambda: f"quantize_rows takes a 2-D tensor, got {shape_str(t) if isinstance(t, Tensor) else type(t)}")
    check(t.is_floating_point(), _OP, lambda: f"quantize_rows takes a floating-point tensor, got {t.dtype}")
    _check_fp8_dtype(dtype)
    if t.shape[1] == 0:  # empty rows: amax 0
        amax = torch.zeros(t.shape[0], 1, dtype=torch.float32, device=t.device)
    else:
        amax = t.abs().amax(dim=1, keepdim=True)  # exact in t's dtype; the max commutes with rounding to fp32
    return _scale_and_data(t, amax, dtype)


def quantize_tensor(t: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> Tuple[Tensor, Tensor]:
    """Tensorwise FP8 quantisation: as :func:`quantize_rows` with one amax over all of ``t`` (any shape);
    returns (data shaped as t in ``dtype``, scale: 0-d fp32 tensor)."""
    check(isinstance(t, Tensor) and t.is_floating_point(), _OP,
          lambda: f"quantize_tensor takes a floating-point tensor, got "
                  f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    _check_fp8_dtype(dtype)
    amax = t.abs().amax() if t.numel() else torch.zeros((), dtype=torch.float32, device=t.device)
    return _scale_and_data(t, amax, dtype)


def dequantize(data: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``data * scale`` (scale broadcast: (R, 1), (1, C) or 0-d) in ``dtype``. Computed in float64 when
    ``dtype`` is float64 (exact: 4 or 3 significant bits times fp32's 24), else in fp32 then cast (one
    rounding)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (data.to(wide) * scale.to(wide)).to(dtype)


# ------------------------------------------------------------------------------------------------ recipes

_SCALINGS = ("rowwise", "tensorwise")
_WEIGHT_GRADS = ("fp8", "high")


@dataclass(frozen=True)
class Fp8Recipe:
    """How an FP8 linear quantises.

    scaling: ``"rowwise"`` (a scale per row of each GEMM operand along its reduction dimension) or
    ``"tensorwise"`` (one scale per operand). grad_dtype: the fp8 dtype of dY (``torch.float8_e4m3fn`` or
    ``torch.float8_e5m2``); x and weight are always e4m3. weight_grad: ``"fp8"`` (dW as an FP8 GEMM) or
    ``"high"`` (dW = dY^T @ X in the output dtype)."""

    scaling: str = "rowwise"
    grad_dtype: torch.dtype = torch.float8_e4m3fn
    weight_grad: str = "fp8"

    def __post_init__(self):
        check(self.scaling in _SCALINGS, _OP,
              lambda: f"Fp8Recipe.scaling must be one of {', '.join(_SCALINGS)}, got {self.scaling!r}")
        check(self.grad_dtype in FP8_DTYPES, _OP,
              lambda: f"Fp8Recipe.grad_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, "
                      f"got {self.grad_dtype!r}")
        check(self.weight_grad in _WEIGHT_GRADS, _OP,
              lambda: f"Fp8Recipe.weight_grad must be one of {', '.join(_WEIGHT_GRADS)}, got {self.weight_grad!r}")

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"


RECIPES: Dict[str, Fp8Recipe] = {
    "rowwise": Fp8Recipe("rowwise", torch.float8_e4m3fn, "fp8"),
    "rowwise_hp_wgrad": Fp8Recipe("rowwise", torch.float8_e4m3fn, "high"),
    "tensorwise": Fp8Recipe("tensorwise", torch.float8_e5m2, "fp8"),
}


def resolve_recipe(recipe: Union[str, Fp8Recipe]) -> Fp8Recipe:
    """An :class:`Fp8Recipe` from a preset name (``RECIPES``) or a recipe; ValueError otherwise."""
    if isinstance(recipe, Fp8Recipe):
        return recipe
    check(isinstance(recipe, str) and recipe in RECIPES, _OP,
          lambda: f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)} or pass an Fp8Recipe")
    return RECIPES[recipe]


# ----------------------------------------------------------------------------------------- input checks

def _rows_shape(x: Tensor) -> Tuple[int, int]:
    """(M, K): x (..., K) as the GEMM's rows."""
    return math.prod(x.shape[:-1]), x.shape[-1]


def _rows(x: Tensor) -> Tensor:
    """x (..., K) flattened to (M, K) (a view where strides allow; reshape(-1, K) fails for K = 0)."""
    return x.reshape(_rows_shape(x))


def output_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], recipe, x_fp8) -> Fp8Recipe:
    recipe = resolve_recipe(recipe)
    check_linear_inputs(_OP, x, weight, bias)
    if x_fp8 is not None:
        _check_x_fp8(x, recipe, x_fp8)
    return recipe


def _check_x_fp8(x: Tensor, recipe: Fp8Recipe, x_fp8) -> None:
    check(recipe.rowwise, _OP, lambda: f"x_fp8 is x quantised per row; recipe scaling {recipe.scaling!r} needs "
                                       f"a per-tensor scale (use a rowwise recipe, or pass no x_fp8)")
    check(isinstance(x_fp8, (tuple, list)) and len(x_fp8) == 2
          and all(isinstance(t, Tensor) for t in x_fp8), _OP,
          lambda: f"x_fp8 must be a pair (data, scale) of tensors, got {type(x_fp8).__name__}")
    data, scale = x_fp8
    M, K = _rows_shape(x)
    check(data.dtype == X_DTYPE, _OP, lambda: f"x_fp8 data must be {X_DTYPE}, got {data.dtype}")
    check(tuple(data.shape) in (tuple(x.shape), (M, K)), _OP,
          lambda: f"x_fp8 data must be shaped as x {shape_str(x)} or ({M}, {K}), got {shape_str(data)}")
    check(scale.dtype == torch.float32, _OP, lambda: f"x_fp8 scale must be torch.float32, got {scale.dtype}")
    check(tuple(scale.shape) == (*data.shape[:-1], 1), _OP,
          lambda: f"x_fp8 scale must be ({', '.join(str(s) for s in (*data.shape[:-1], 1))}) for data "
                  f"{shape_str(data)} (one scale per row), got {shape_str(scale)}")
    check(data.device == x.device and scale.device == x.device, _OP,
          lambda: f"x_fp8 must be on x's device {x.device}, got data on {data.device}, scale on {scale.device}")


def _check_w_fp8(weight: Tensor, recipe: Fp8Recipe, w_fp8) -> None:
    check(recipe.rowwise, _OP, "w_fp8 is the weight quantised per row: it needs a rowwise recipe")
    check(not (torch.is_grad_enabled() and weight.requires_grad), _OP,
          "w_fp8 (a cached quantised weight) is for calls without gradients; with them the weight is quantised "
          "in both layouts by the op itself")
    data, scale = w_fp8
    N, K = weight.shape
    check(data.dtype == X_DTYPE and tuple(data.shape) == (N, K) and data.is_contiguous(), _OP,
          lambda: f"w_fp8 data must be a contiguous ({N}, {K}) {X_DTYPE} tensor, got {shape_str(data)} {data.dtype}")
    check(scale.dtype == torch.float32 and tuple(scale.shape) == (N, 1), _OP,
          lambda: f"w_fp8 scale must be float32 ({N}, 1), got {shape_str(scale)} {scale.dtype}")


def _cuda_reason(device: torch.device, K: int, N: int) -> Optional[str]:
    """Why ``torch._scaled_mm`` on this CUDA device cannot run a (M, K) x (K, N) FP8 GEMM and its backward."""
    if torch.version.hip is not None:
        return "ROCm: its FP8 GEMMs take the *fnuz formats on MI300; fastdit's FP8 path is written for CUDA"
    capability = torch.cuda.get_device_capability(device)
    return join_reasons(
        None if capability >= CUDA_MIN_CAPABILITY else
        f"torch._scaled_mm needs compute capability >= 8.9 (Ada, Hopper or newer), this GPU is "
        f"sm_{capability[0]}{capability[1]}",
        _alignment_reason(K, N))


def _alignment_reason(K: int, N: int) -> Optional[str]:
    """cuBLASLt's FP8 GEMMs need both dimensions of the b operand to be multiples of 16: K and N for the
    forward and dgrad (the wgrad's M is padded)."""
    bad = [f"{name} = {n}" for name, n in (("in (K)", K), ("out (N)", N)) if n % CUDA_ALIGN]
    if bad:
        return (", ".join(bad) + f" not a multiple of {CUDA_ALIGN}; torch._scaled_mm on CUDA needs K and N "
                "multiples of 16")
    return None


def fast_path_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why ``torch._scaled_mm`` cannot take these inputs (forward and backward), or None.

    Everywhere: x, weight and the output in float16/bfloat16/float32 (the dtypes ``_scaled_mm`` writes on
    CUDA: the gradients are written directly in x's and weight's dtypes), nothing empty. CPU: nothing else
    (torch 2.13's CPU ``_scaled_mm`` takes any K, N and layout). CUDA: compute capability >= 8.9, K and N
    multiples of 16, not ROCm. Other devices: the reference."""
    out = output_dtype(x)
    K, N = weight.shape[1], weight.shape[0]
    device = x.device
    return join_reasons(
        None if device.type in ("cpu", "cuda") else
        f"x is on {device}; torch._scaled_mm's FP8 GEMMs run on CUDA and CPU",
        None if x.dtype in FAST_DTYPES and weight.dtype in FAST_DTYPES and out in FAST_DTYPES else
        f"x is {x.dtype}, weight {weight.dtype}, output {out}; the FP8 GEMMs take and return float16, "
        f"bfloat16 and float32",
        None if x.numel() and weight.numel() else "x or weight is empty",
        _cuda_reason(device, K, N) if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------- GEMM operands
# The fast path and the reference share these: both multiply the same quantised operands.

Operands = Tuple[Tensor, Tensor, Tensor, Tensor]  # a (P, R) row-major, scale_a, b (R, Q) column-major, scale_b


def _quant_kernel_ok(t: Tensor) -> bool:
    """Whether fastdit's quantisation kernel (fastdit.kernels.fp8_quantize: any strides, transposed output,
    one amax pass for both sides) computes the rowwise operands: eagerly on CUDA or under the interpreter. While
    torch.compile traces, the torch ops below are used (Inductor fuses their amax and cast itself)."""
    return t.numel() > 0 and kernel_can_run(t) and not torch.compiler.is_compiling()


def _rows_of(t: Tensor, dtype: torch.dtype, pad_to: int = 1, fast: bool = False) -> Tuple[Tensor, Tensor]:
    """quantize_rows(t) as a row-major (rows, cols_pad) operand -- columns padded with zeros up to a multiple of
    ``pad_to`` -- and its (rows, 1) scale. ``fast``: with the kernel where it runs (the same bits), reading t
    through its strides (t may be a transposed view); the reference always uses the torch ops."""
    if fast and _quant_kernel_ok(t):
        from fastdit.kernels.fp8_quantize import quantize_rows_cols
        _, _, data_t, scale = quantize_rows_cols(t.t(), None, dtype, EPS, pad_to=pad_to)
        return data_t, scale
    pad = -t.shape[1] % pad_to
    data, scale = quantize_rows(F.pad(t, (0, pad)) if pad else t, dtype)
    return data.contiguous(), scale


def _a_operand(a: Tensor, dtype: torch.dtype, rowwise: bool, pad_to: int = 1, fast: bool = False
               ) -> Tuple[Tensor, Tensor]:
    """a (P, R), reduced over R: quantised per row (P scales) or per tensor; data row-major."""
    if rowwise:
        return _rows_of(a, dtype, pad_to, fast)
    pad = -a.shape[1] % pad_to
    data, scale = quantize_tensor(F.pad(a, (0, pad)) if pad else a, dtype)
    return data.contiguous(), scale


def _b_operand(b_t: Tensor, dtype: torch.dtype, rowwise: bool, pad_to: int = 1, fast: bool = False
               ) -> Tuple[Tensor, Tensor]:
    """The b operand (R, Q) given as its transpose b_t (Q, R), reduced over R: quantised per column of b
    (Q scales, returned as (1, Q)) or per tensor; data column-major."""
    data, scale = _a_operand(b_t, dtype, rowwise, pad_to, fast)
    return data.t(), scale.t() if rowwise else scale


def _forward_operands(x2: Tensor, weight: Tensor, recipe: Fp8Recipe, x_fp8, fast: bool = False,
                      w_fp8=None) -> Operands:
    """y = X @ W^T: X (M, K) per row, W (N, K) per row (= per column of W^T). ``w_fp8``: W already quantised
    per row ((N, K) row-major data, (N, 1) scale), e.g. cached across inference calls."""
    if x_fp8 is not None:
        M, K = x2.shape
        xq, sx = x_fp8[0].reshape(M, K).contiguous(), x_fp8[1].reshape(M, 1).contiguous()
    else:
        xq, sx = _a_operand(x2, X_DTYPE, recipe.rowwise, fast=fast)
    if w_fp8 is not None:
        wq, sw = w_fp8[0].t(), w_fp8[1].t()
    else:
        wq, sw = _b_operand(weight, X_DTYPE, recipe.rowwise, fast=fast)
    return xq, sx, wq, sw


def _dgrad_operands(dy: Tensor, weight: Tensor, recipe: Fp8Recipe, dy_rows=None, fast: bool = False) -> Operands:
    """dX = dY @ W: dY (M, N) per row in the grad dtype, W (N, K) per column. ``dy_rows``: dY's rows already
    quantised (the fused pass of :func:`_backward_dy_operands`)."""
    dyq, sdy = dy_rows if dy_rows is not None else _a_operand(dy, recipe.grad_dtype, recipe.rowwise, fast=fast)
    wq, sw = _b_operand(weight.t(), X_DTYPE, recipe.rowwise, fast=fast)
    return dyq, sdy, wq, sw


def _wgrad_operands(dy: Tensor, x2: Tensor, recipe: Fp8Recipe, pad_to: int = 1, dy_cols=None,
                    fast: bool = False) -> Operands:
    """dW = dY^T @ X: dY^T (N, M) per row (= per column of dY) in the grad dtype, X (M, K) per column, X taken in
    dY's dtype (the forward's output dtype: what the forward saved, as an autocast Linear saves its input).
    ``pad_to``: zero tokens appended up to a multiple of it (the reduction dimension; zeros change no amax,
    quantise to 0 and add exact zeros). ``dy_cols``: dY^T already quantised and padded."""
    dytq, sdyt = dy_cols if dy_cols is not None else _a_operand(dy.t(), recipe.grad_dtype, recipe.rowwise, pad_to,
                                                                fast)
    xq, sx = _b_operand(x2.to(dy.dtype).t(), X_DTYPE, recipe.rowwise, pad_to, fast)
    return dytq, sdyt, xq, sx


def _backward_dy_operands(dy: Tensor, recipe: Fp8Recipe, rows: bool, cols: bool, pad_to: int):
    """(dY per row, dY^T per row padded) for the dgrad and the wgrad, from one amax pass and one quantising
    pass over dY when the kernel runs (rowwise recipes); (None, None) otherwise: each GEMM quantises its own."""
    if not (recipe.rowwise and (rows or cols) and _quant_kernel_ok(dy)):
        return None, None
    from fastdit.kernels.fp8_quantize import quantize_rows_cols
    gd = recipe.grad_dtype
    rq, rs, cq, cs = quantize_rows_cols(dy, gd if rows else None, gd if cols else None, EPS, pad_to=pad_to)
    return ((rq, rs) if rows else None), ((cq, cs) if cols else None)


# ------------------------------------------------------------------------------------------- fast path

_ROWWISE_OUT: Dict[Tuple[str, torch.dtype], bool] = {}


def _rowwise_writes(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales writes ``out_dtype`` on this CUDA device (some builds
    take bfloat16 only): probed once per (device, dtype) on a 16x16x16 GEMM, eagerly; while torch.compile
    traces before any probe, assumed not."""
    key = (str(device), out_dtype)
    if key not in _ROWWISE_OUT:
        if torch.compiler.is_compiling():
            return False
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        ones = torch.ones(16, 1, device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=out_dtype)
            _ROWWISE_OUT[key] = True
        except RuntimeError:
            _ROWWISE_OUT[key] = False
    return _ROWWISE_OUT[key]


_CPU_ROWWISE: Dict[str, bool] = {}


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this CPU build's ``torch._scaled_mm`` takes row-wise scales (torch 2.13 does; torch 2.11's
    oneDNN path asserts per-tensor scales): probed once, eagerly; while torch.compile traces before any probe,
    assumed not."""
    if "cpu" not in _CPU_ROWWISE:
        if torch.compiler.is_compiling():
            return False
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        ones = torch.ones(16, 1)
        try:
            out = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.float32)
            _CPU_ROWWISE["cpu"] = bool((out == 16).all())
        except (RuntimeError, NotImplementedError):
            _CPU_ROWWISE["cpu"] = False
    return _CPU_ROWWISE["cpu"]


def _emulated_scaled_mm(operands: Operands, out_dtype: torch.dtype, bias: Optional[Tensor]) -> Tensor:
    """What ``torch._scaled_mm`` computes, for CPU builds without row-wise scales: the fp8 operands multiplied in
    fp32 (each product of two fp8 values is exact in fp32), then scaled per row and column, bias added, cast."""
    a, sa, b, sb = operands
    out = torch.mm(a.float(), b.float()) * sa * sb
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _scaled_gemm(operands: Operands, out_dtype: torch.dtype, bias: Optional[Tensor] = None) -> Tensor:
    a, sa, b, sb = operands
    if a.device.type == "cpu" and (sa.numel() > 1 or sb.numel() > 1) and not _cpu_rowwise_scaled_mm():
        return _emulated_scaled_mm(operands, out_dtype, bias)
    if a.is_cuda and out_dtype != torch.bfloat16 and (sa.numel() > 1 or sb.numel() > 1) \
            and not _rowwise_writes(a.device, out_dtype):
        # this CUDA build's row-wise scaled GEMM (CUTLASS f8f8bf16) writes bfloat16 only: take that and cast
        # (an autocast bf16 Linear's gradients are bf16 too before they reach fp32 parameters)
        return _scaled_gemm(operands, torch.bfloat16, bias).to(out_dtype)
    if bias is not None and out_dtype in (torch.bfloat16, torch.float16):
        # fused in the epilogue; CUDA wants the bias in the output dtype (and none with an fp32 output)
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias.to(out_dtype), out_dtype=out_dtype)
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return out if bias is None else out.add_(bias.to(out_dtype))


def _pair(data: Optional[Tensor], scale: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """x_fp8 as the autograd Functions receive it (two tensor arguments) back to ``(data, scale)`` or None."""
    return None if data is None else (data, scale)


def _save_for_backward(ctx, x2: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: Fp8Recipe,
                       out_dtype: torch.dtype) -> None:
    """What the fast and the reference Function's backward need. x in the output dtype, not its fp8 copy (the
    wgrad quantises X per column; the "high" recipe multiplies it as is) and not in x's own dtype: under bf16
    autocast an fp32 x is saved in bf16, as autocast's Linear saves its bf16 copy (half the memory)."""
    ctx.save_for_backward(x2.to(out_dtype), weight)
    ctx.recipe, ctx.out_dtype, ctx.x_dtype = recipe, out_dtype, x2.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


class _Fp8LinearFunction(torch.autograd.Function):
    """y = X @ W^T + b with FP8 GEMMs; x2 is x flattened to (M, K)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, recipe, out_dtype, x_fp8_data, x_fp8_scale):
        with torch.autocast(x2.device.type, enabled=False):
            y = _scaled_gemm(_forward_operands(x2, weight, recipe, _pair(x_fp8_data, x_fp8_scale), fast=True),
                             out_dtype, bias)
        _save_for_backward(ctx, x2, weight, bias, recipe, out_dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        recipe = ctx.recipe
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(ctx.out_dtype)
            fp8_wgrad = need_w and recipe.weight_grad != "high"
            dy_rows, dy_cols = _backward_dy_operands(dy, recipe, need_x, fp8_wgrad, CUDA_ALIGN)
            if need_x:
                dx = _scaled_gemm(_dgrad_operands(dy, weight, recipe, dy_rows, fast=True), ctx.x_dtype)
            if need_w:
                if recipe.weight_grad == "high":
                    dw = torch.mm(dy.t(), x2).to(weight.dtype)  # x2 is saved in dy's dtype
                else:
                    dw = _scaled_gemm(_wgrad_operands(dy, x2, recipe, CUDA_ALIGN, dy_cols, fast=True), weight.dtype)
            if need_b and ctx.bias_dtype is not None:
                db = dy.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
               recipe: Union[str, Fp8Recipe] = "rowwise", x_fp8: Optional[Tuple[Tensor, Tensor]] = None,
               backend: Optional[str] = None, w_fp8: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``x @ weight.T + bias`` as FP8 GEMMs (forward and backward); x (..., K), weight (N, K), bias (N,) or
    None; returns (..., N) in the autocast dtype (autocast on) or x's dtype.

    ``recipe``: a name in :data:`RECIPES` or an :class:`Fp8Recipe`. ``x_fp8``: x already quantised per row,
    ``(data, scale)`` (see the module docstring). ``backend``: ``"auto"`` takes ``torch._scaled_mm`` where it
    can run these inputs (:func:`fast_path_reason`) and the reference elsewhere; ``"triton"`` (the fast path)
    raises where it cannot; ``"reference"``: :func:`fp8_linear_ref`. ``w_fp8``: ``quantize_rows(weight)`` already
    computed (``(data (N, K) e4m3 row-major, scale (N, 1))``, e.g. cached between inference calls: see
    :class:`fastdit.modules.fp8.Fp8Linear`); no-grad calls only, rowwise recipes only.
    """
    recipe = _check_inputs(x, weight, bias, recipe, x_fp8)
    if w_fp8 is not None:
        _check_w_fp8(weight, recipe, w_fp8)
    if not use_triton(_OP, backend, lambda: fast_path_reason(x, weight, bias), True):
        return _reference(x, weight, bias, recipe, x_fp8)
    if w_fp8 is not None:
        with torch.autocast(x.device.type, enabled=False):
            y = _scaled_gemm(_forward_operands(_rows(x), weight, recipe, x_fp8, fast=True, w_fp8=w_fp8),
                             output_dtype(x), bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    data, scale = (None, None) if x_fp8 is None else x_fp8
    y = _Fp8LinearFunction.apply(_rows(x), weight, bias, recipe, output_dtype(x), data, scale)
    return y.view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------- reference

def _dequant_gemm(operands: Operands, dtype: torch.dtype) -> Tensor:
    a, sa, b, sb = operands
    return dequantize(a, sa, dtype) @ dequantize(b, sb, dtype)


def _forward_math(x2: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: Fp8Recipe, x_fp8,
                  dtype: torch.dtype) -> Tensor:
    y = _dequant_gemm(_forward_operands(x2, weight, recipe, x_fp8), dtype)
    return y if bias is None else y + bias.to(dtype)


def _backward_math(dy: Tensor, x2: Tensor, weight: Tensor, with_bias: bool, recipe: Fp8Recipe,
                   dtype: torch.dtype) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dX, dW, dbias) in ``dtype``; dy is in the forward's output dtype."""
    dx = _dequant_gemm(_dgrad_operands(dy, weight, recipe), dtype)
    if recipe.weight_grad == "high":
        dw = dy.to(dtype).t() @ x2.to(dy.dtype).to(dtype)  # the fast path's operands: x in the output dtype
    else:
        dw = _dequant_gemm(_wgrad_operands(dy, x2, recipe), dtype)
    db = dy.to(torch.float64 if dtype == torch.float64 else torch.float32).sum(0).to(dtype) if with_bias \
        else None
    return dx, dw, db


class _Fp8LinearRefFunction(torch.autograd.Function):
    """The reference: the fast path's quantised operands, multiplied in float64."""

    @staticmethod
    def forward(ctx, x2, weight, bias, recipe, out_dtype, x_fp8_data, x_fp8_scale):
        with torch.autocast(x2.device.type, enabled=False):
            y = _forward_math(x2, weight, bias, recipe, _pair(x_fp8_data, x_fp8_scale), torch.float64).to(out_dtype)
        _save_for_backward(ctx, x2, weight, bias, recipe, out_dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            dx, dw, db = _backward_math(dy.to(ctx.out_dtype), x2, weight, ctx.bias_dtype is not None, ctx.recipe,
                                        torch.float64)
        return (dx.to(ctx.x_dtype), dw.to(weight.dtype), None if db is None else db.to(ctx.bias_dtype),
                None, None, None, None)


def _reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: Fp8Recipe, x_fp8) -> Tensor:
    data, scale = (None, None) if x_fp8 is None else x_fp8
    y = _Fp8LinearRefFunction.apply(_rows(x), weight, bias, recipe, output_dtype(x), data, scale)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                   recipe: Union[str, Fp8Recipe] = "rowwise", x_fp8: Optional[Tuple[Tensor, Tensor]] = None,
                   backend: Optional[str] = None) -> Tensor:
    """Reference of :func:`fp8_linear` (same signature; ``backend`` is accepted and ignored): the same
    quantised operands, dequantised to float64 and multiplied in float64, in the fast op's output and
    gradient dtypes. Differentiable (its backward quantises dY and multiplies in float64 likewise)."""
    recipe = _check_inputs(x, weight, bias, recipe, x_fp8)
    return _reference(x, weight, bias, recipe, x_fp8)


def fp8_linear_ref_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                           recipe: Union[str, Fp8Recipe] = "rowwise", x_fp8: Optional[Tuple[Tensor, Tensor]] = None,
                           compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """The reference forward, (..., N) in ``compute_dtype`` (uncast; no autograd): dequantised operands in
    ``compute_dtype`` multiplied in it, plus bias."""
    recipe = _check_inputs(x, weight, bias, recipe, x_fp8)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        y = _forward_math(_rows(x), weight, bias, recipe, x_fp8, compute_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_linear_ref_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                            recipe: Union[str, Fp8Recipe] = "rowwise", compute_dtype: torch.dtype = torch.float64
                            ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The reference backward in ``compute_dtype`` (uncast): (dx shaped as x, dweight (N, K), dbias (N,) or
    None). ``dy`` (..., N) must be in the forward's output dtype (what autograd hands the op): it is what the
    backward quantises, and the dtype of the ``"high"`` wgrad's operands."""
    recipe = _check_inputs(x, weight, bias, recipe, None)
    N = weight.shape[0]
    out_shape = (*x.shape[:-1], N)
    check(tuple(dy.shape) == out_shape, _OP,
          lambda: f"dy must be shaped as the output ({', '.join(map(str, out_shape))}), got {shape_str(dy)}")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        dx, dw, db = _backward_math(_rows(dy), _rows(x), weight, bias is not None, recipe, compute_dtype)
    return dx.view(x.shape), dw, db

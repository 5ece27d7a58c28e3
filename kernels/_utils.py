"""Small helpers shared by the launchers: output allocation (with a poison switch for tests), launch
sizing, and the device's processor count."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tests set this to True: every output buffer then starts as NaN (0x7F.. for integers is not needed:
# outputs are floating point), so an element a kernel forgets to write cannot pass a comparison.
POISON_OUTPUTS = False


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launcher(kernel, like: torch.Tensor):
    """What to launch ``kernel`` through (``launcher(k, out)[grid](...)``): the kernel itself for real
    tensors; ``torch.library.wrap_triton(kernel)`` while torch.compile traces one of fastdit's
    ``triton_op``s (``like``, a tensor the launcher allocated, is then fake or functional), so that the
    launch is recorded in the graph and Inductor calls the kernel from its generated code, with no
    Python op between (fastdit.ops._common.library_op)."""
    if type(like) is torch.Tensor:
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def processor_count(device: torch.device) -> int:
    """Streaming multiprocessors on a GPU; a small fixed number under the CPU interpreter (it runs
    programs one after another, so more programs only cost time — but several still exercise the
    cross-program reductions)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


# Host-side sizing in plain Python: since Triton 3.5 triton.cdiv / triton.next_power_of_2 are constexpr
# functions whose Python wrapper costs microseconds per call (13 calls per adaln forward + backward: ~60 us of
# host time under Triton 3.9, measured), and launches run on the host's critical path at small batch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def warps_for(elements: int, lo: int = 1, hi: int = 16) -> int:
    """Warps for a program holding ``elements`` values: about 8 per thread, as a power of two."""
    return max(lo, min(hi, next_pow2(elements // 256)))


@triton.jit
def _sum_chunks_kernel(P, OUT0, OUT1, OUT2, BD, D, n_chunks, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    """OUTk[b, d] = sum over c of P[k, b, c, d] (k = program_id(1)), reading [BLOCK_C, BLOCK] tiles of
    chunks and summing the tile in a fixed order at the end: deterministic."""
    k = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # i = b * D + d
    ok = i < BD
    i = i.to(tl.int64)
    b = i // D
    base = k.to(tl.int64) * BD * n_chunks + b * n_chunks * D + (i - b * D)
    c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        cc = (c0 + c).to(tl.int64)
        acc += tl.load(P + base[None, :] + cc[:, None] * D, mask=(cc < n_chunks)[:, None] & ok[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if k == 0:
        tl.store(OUT0 + i, to_dtype_rtne(total, OUT0.dtype.element_ty), mask=ok)
    elif k == 1:
        tl.store(OUT1 + i, to_dtype_rtne(total, OUT1.dtype.element_ty), mask=ok)
    else:
        tl.store(OUT2 + i, to_dtype_rtne(total, OUT2.dtype.element_ty), mask=ok)


@triton.jit
def to_dtype_rtne(x, dtype: tl.constexpr):
    """fp32 ``x`` -> ``dtype``, rounding to nearest even.

    Triton's CPU interpreter (3.9) truncates float32 -> bfloat16 (compiled GPU code rounds to
    nearest even); rounding the bit pattern ourselves gives the same bits on both. NaN stays NaN;
    values past the largest bfloat16 become inf, as in round-to-nearest."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def fp8_grid_rtne(x, MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """fp32 ``x`` rounded to nearest even onto the grid of an fp8 format with MANT_BITS mantissa bits
    (e4m3: 3; e5m2: 2) and smallest normal 2**MIN_NORMAL_EXP (e4m3: -6; e5m2: -14), still as fp32; the
    caller clamps to the format's range first. The cast of the result to fp8 is then exact, so compiled
    code and Triton's CPU interpreter (3.9), whose fp32 -> fp8 cast does not round to nearest even, give
    the same bits as ``torch``'s cast. Normal range: round the bit pattern (as :func:`to_dtype_rtne`);
    subnormal range (fixed spacing 2**(MIN_NORMAL_EXP - MANT_BITS)): add and subtract 1.5 * 2**(23 +
    MIN_NORMAL_EXP - MANT_BITS), whose fp32 ulp is that spacing, so the fp32 addition rounds to it; done on
    |x| with x's sign bit put back, so tiny negatives give -0 as torch's cast does."""
    drop: tl.constexpr = 23 - MANT_BITS
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> drop) & 1) + ((1 << (drop - 1)) - 1))) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    normal = bits.to(tl.float32, bitcast=True)
    magic: tl.constexpr = 1.5 * 2.0 ** (23 + MIN_NORMAL_EXP - MANT_BITS)
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    tiny = ((tl.abs(x) + magic) - magic).to(tl.uint32, bitcast=True) | sign
    tiny = tiny.to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) >= 2.0 ** MIN_NORMAL_EXP, normal, tiny)


def sum_chunks(partials: torch.Tensor, outs) -> None:
    """outs[k][b, d] = partials[k, b, :, d].sum() in a fixed order (deterministic), in each out's dtype.

    partials: fp32 (K, B, C, D) with K = len(outs) ≤ 3; outs: K tensors of B*D elements, contiguous.
    """
    K, B, C, D = partials.shape
    if B * D == 0:
        return
    if C == 0:
        for out in outs:
            out.zero_()
        return
    if B == 1 and C > 256:
        # Few sums over many chunks (a weight gradient from one partial row per program): first reduce
        # groups of 128 consecutive chunks side by side, then the groups. Still a fixed order.
        groups = cdiv(C, 128)
        padded = torch.zeros((K, groups * 128, D), dtype=partials.dtype, device=partials.device)
        padded[:, :C] = partials[:, 0]
        stage = torch.empty((K, groups * D), dtype=torch.float32, device=partials.device)
        sum_chunks(padded.view(K, groups, 128, D), list(stage.unbind(0)))
        sum_chunks(stage.view(K, 1, groups, D), outs)
        return
    block_c = min(32, next_pow2(C))
    block = max(32, min(1024, 4096 // block_c))
    launcher(_sum_chunks_kernel, outs[0])[(cdiv(B * D, block), K)](
        partials, outs[0], outs[min(1, K - 1)], outs[K - 1], B * D, D, C, BLOCK_C=block_c, BLOCK=block, num_warps=4)

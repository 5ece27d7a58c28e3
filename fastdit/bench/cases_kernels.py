"""Memory-bound kernels: fastdit's fused Triton ops against their reference math, eager and compiled.

Ops (each as ``<op>.fwd``, ``<op>.bwd`` and ``<op>.fwd+bwd``):

- ``adaln``: ``fastdit.ops.adaln_modulate(x, shift, scale)`` = LN(x)·(1 + scale) + shift, x (B, N, D),
  shift/scale (B, D);
- ``gated_adaln``: ``gated_residual_adaln(x, y, gate, shift, scale)`` = (x' = x + gate·y, adaln(x'));
- ``rope``: ``rope(q, freqs)`` on q (B, N, H, d), a view of a fused (B, N, 3, H, d) QKV projection, with a
  2-D axial table (N, d/2, 2) float32;
- ``qk_norm_rope``: ``qk_norm_rope(q, k, q_weight, k_weight, freqs)``, per-head RMSNorm (fp32 weights)
  then RoPE of q and k (views of one QKV projection).

Directions, as the GPU benchmarks time them: ``fwd`` under ``no_grad``; ``fwd+bwd`` forward then
``autograd.grad`` w.r.t. every input with fixed random cotangents (made before timing); ``bwd`` alone,
``autograd.grad`` over a graph retained from one untimed forward.

Bytes (each input read once, each output written once; tables and (B, D) vectors included):
fwd = forward inputs + outputs; bwd = cotangents + the forward inputs its backward needs (adaln, gated,
qk_norm_rope: all of them; rope: the table only) + gradients; fwd+bwd = forward inputs + cotangents +
outputs + gradients. (The older ``benchmarks/test_adaln.py`` counted fwd+bwd as fwd + bwd passes, i.e.
x read twice; the figure here is the minimum a fused forward+backward must move.)

Peers: ``fastdit`` (``backend="triton"``; on the CPU Triton's interpreter, tiny shapes only), ``eager``
(the ``_ref`` function), ``compile`` (``torch.compile(_ref, dynamic=False)``), ``compile-max-autotune``
(``mode="max-autotune-no-cudagraphs"``; skipped on the CPU). Check: fastdit.testing's rule for every
output and gradient — max error against a float64 reference at most 2× that of the reference computed in
the inputs' dtype, plus the dtype's floor.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (check_2x, compiled, direction_call, DIRECTIONS, guard_size, MAX_AUTOTUNE,
                                 max_autotune_peer, reference_results, tensor_bytes, triton_skip)
from fastdit.ops import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref,
                         qk_norm_rope, qk_norm_rope_ref, rope, rope_freqs_2d, rope_ref)
from fastdit.testing import gated_residual_adaln_float64

GROUP = "kernels"

# (B, N, D): DiT-XL/2 256 px, Flux 1024 px (4096 image tokens, width 3072), SD3 1024 px (4608 tokens, 1536)
ADALN_SHAPES = {"dit-xl2": (64, 256, 1152), "flux": (2, 4096, 3072), "sd3": (8, 4608, 1536)}
ADALN_QUICK = {"dit-xl2": (2, 7, 72), "flux": (1, 9, 96)}
# (B, N, H, d): Flux/SD3 1024 px (4608 = 4096 image + 512 caption tokens), DiT-XL/2 256 px; N = rows x cols
ROPE_SHAPES = {"flux": (2, 72, 64, 24, 128), "dit-xl2": (64, 16, 16, 16, 72)}  # (B, rows, cols, H, d)
ROPE_QUICK = {"flux": (1, 2, 4, 2, 64), "dit-xl2": (2, 3, 3, 2, 72)}


def _fastdit(fn: Callable, backend: str = "triton") -> Callable:
    def forward(*args):
        return fn(*args, backend=backend)
    return forward


class _Op:
    """One op: how to make its inputs and what its backward reads."""

    def __init__(self, name: str, fast: Callable, ref: Callable, ref64: Callable, dims: Callable,
                 inputs: Callable, extra: Callable, names: List[str], bwd_reads: Callable):
        self.name, self.fast, self.ref, self.ref64 = name, fast, ref, ref64
        self.dims, self.inputs, self.extra, self.names, self.bwd_reads = dims, inputs, extra, names, bwd_reads


def _adaln_inputs(ctx, p):
    B, N, D = p
    return [ctx.randn(B, N, D, requires_grad=True), ctx.randn(B, D, requires_grad=True),
            ctx.randn(B, D, requires_grad=True)], ()


def _gated_inputs(ctx, p):
    B, N, D = p
    return [ctx.randn(B, N, D, requires_grad=True), ctx.randn(B, N, D, requires_grad=True),
            ctx.randn(B, D, requires_grad=True), ctx.randn(B, D, requires_grad=True),
            ctx.randn(B, D, requires_grad=True)], ()


def _qkv_views(ctx, B, N, H, d, count):
    """q (and k): (B, N, H, d) views of one fused QKV projection output (B, N, 3, H, d), requiring grad."""
    qkv = ctx.randn(B, N, 3, H, d)
    return [t.requires_grad_() for t in qkv.unbind(2)[:count]]


def _rope_inputs(ctx, p):
    B, rows, cols, H, d = p
    freqs = rope_freqs_2d(rows, cols, d, device=ctx.device)
    return _qkv_views(ctx, B, rows * cols, H, d, 1), (freqs,)


def _qk_inputs(ctx, p):
    B, rows, cols, H, d = p
    freqs = rope_freqs_2d(rows, cols, d, device=ctx.device)
    weights = [(1 + 0.1 * ctx.randn(d, dtype=torch.float32)).requires_grad_() for _ in range(2)]
    return _qkv_views(ctx, B, rows * cols, H, d, 2) + weights, (freqs,)


def _adaln_dims(p):
    return "B={} N={} D={}".format(*p)


def _rope_dims(p):
    B, rows, cols, H, d = p
    return f"B={B} N={rows * cols} ({rows}x{cols}) H={H} d={d}"


OPS = {
    "adaln": _Op("adaln", _fastdit(adaln_modulate), adaln_modulate_ref, adaln_modulate_ref, _adaln_dims,
                 _adaln_inputs, lambda extra: (), ["y", "x", "shift", "scale"],
                 lambda inputs, extra: inputs),
    "gated_adaln": _Op("gated_adaln", _fastdit(gated_residual_adaln), gated_residual_adaln_ref, None,
                       _adaln_dims, _gated_inputs, lambda extra: (), ["x_new", "out", "x", "y", "gate", "shift",
                                                                      "scale"],
                       lambda inputs, extra: inputs),
    "rope": _Op("rope", _fastdit(rope), rope_ref, rope_ref, _rope_dims, _rope_inputs, lambda extra: extra,
                ["q_rot", "q"], lambda inputs, extra: list(extra)),
    "qk_norm_rope": _Op("qk_norm_rope", _fastdit(qk_norm_rope), qk_norm_rope_ref, qk_norm_rope_ref, _rope_dims,
                        _qk_inputs, lambda extra: extra, ["q_out", "k_out", "q", "k", "q_weight", "k_weight"],
                        lambda inputs, extra: list(inputs) + list(extra)),
}


def _with_extra(fn: Callable, extra) -> Callable:
    def forward(*inputs):
        return fn(*inputs, *extra)
    return forward


def _bytes(direction: str, op: _Op, inputs, extra, outs, cotangents) -> float:
    fwd_in = tensor_bytes(*inputs, *extra)
    out = tensor_bytes(*outs)
    grads = tensor_bytes(*inputs)  # each gradient has its input's shape and dtype
    cot = tensor_bytes(*cotangents)
    if direction == "fwd":
        return float(fwd_in + out)
    if direction == "bwd":
        return float(cot + tensor_bytes(*op.bwd_reads(inputs, extra)) + grads)
    return float(fwd_in + cot + out + grads)


def make_kernel(op: _Op, direction: str):
    def make(ctx, shape: str, params) -> Workload:
        elements = 1
        for v in params:
            elements *= v
        guard_size(ctx, elements * (3 if op.name in ("rope", "qk_norm_rope") else 1), f"{op.name}[{shape}]")
        inputs, extra = op.inputs(ctx, params)
        with torch.no_grad():
            outs = [o for o in op.ref(*inputs, *extra)] if op.name in ("gated_adaln", "qk_norm_rope") else \
                [op.ref(*inputs, *extra)]
        cotangents = [ctx.randn(o.shape, dtype=o.dtype) for o in outs]
        eager = _with_extra(op.ref, extra)

        def peer(fn: Callable) -> Callable[[], Callable[[], Any]]:
            return lambda: direction_call(direction, fn, inputs, cotangents)

        skip = triton_skip(ctx)
        peers = [Peer("fastdit", None if skip else peer(_with_extra(op.fast, extra)), skip),
                 Peer("eager", peer(eager)),
                 Peer("compile", lambda: direction_call(direction, compiled(eager), inputs, cotangents))]
        peers.append(max_autotune_peer(ctx, lambda: direction_call(direction, compiled(eager, mode=MAX_AUTOTUNE),
                                                                   inputs, cotangents)))

        if op.name == "gated_adaln":
            def ref64(x, y, gate, shift, scale):
                return gated_residual_adaln_float64(x, y, gate, shift, scale, residual_dtype=inputs[0].dtype)
        else:
            ref64 = _with_extra(op.ref64, extra)

        def reference() -> Dict[str, Any]:
            return reference_results(direction, eager, inputs, cotangents, op.names, ref64)

        return Workload(group=GROUP, name=f"{op.name}.{direction}", shape=shape, dims=op.dims(params), peers=peers,
                        bytes=_bytes(direction, op, inputs, extra, outs, cotangents), reference=reference,
                        check=check_2x(direction))
    return make


for _name, _op in OPS.items():
    _full, _quick = (ADALN_SHAPES, ADALN_QUICK) if _name in ("adaln", "gated_adaln") else (ROPE_SHAPES, ROPE_QUICK)
    for _direction in DIRECTIONS:
        register(Case(group=GROUP, name=f"{_name}.{_direction}", shapes=dict(_full), quick_shapes=dict(_quick),
                      make=make_kernel(_op, _direction),
                      peers=("fastdit", "eager", "compile", "compile-max-autotune")))

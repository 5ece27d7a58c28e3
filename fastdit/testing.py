"""Accuracy checks for fast ops against float64 (flash-attention's rule).

A low-precision result passes when its error against a float64 reference is at most ``factor`` (2) times
the error of the reference computed in the same low dtype, plus a per-dtype floor scaled by the size of
the values. The rule adapts to how hard each output is (a sum over 4,096 tokens rounds worse than an
elementwise product) without hand-tuned tolerances per test.

    ref64 = op_ref(*(t.double() for t in inputs))        # the truth
    ref_lp = op_ref(*inputs)                              # the reference in the same dtype
    assert_close_to_reference(fast_op(*inputs), ref_lp, ref64, name="y")

The floor's size is the larger of max|ref64| and ``scale``, the output's natural magnitude. Pass ``scale``
for outputs whose true value can cancel to exactly zero (the query gradient of attention over one key, a
gradient through a constant): there max|ref64| is 0, both computations return rounding noise of the terms
that cancelled, and "2x the reference's noise" is a coin toss that passes on one processor and fails on
another. :func:`group_scale` gives the natural magnitude of a set of outputs of the same kind (all the
gradients of one call), which is what the terms of each of them are made of.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

# Relative floors (× max|ref64|): for outputs that the low-precision reference happens to get exactly
# right (its error is then 0, and 2 × 0 would demand bit-exactness).
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float            # max |actual - ref64|
    reference_error: float  # max |ref_same_dtype - ref64|
    allowed: float          # factor * reference_error + floor

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: error {self.error:.3e} vs allowed {self.allowed:.3e} "
                f"(same-dtype reference error {self.reference_error:.3e}) {verdict}")


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max().item()


def compare_to_reference(actual: Tensor, reference: Tensor, reference64: Tensor, *, name: str = "output",
                         factor: float = 2.0, floor: Optional[float] = None,
                         scale: Optional[float] = None) -> Comparison:
    """Measure ``actual`` against the float64 truth and the same-dtype reference's own error.

    ``scale``: the output's natural magnitude when its true value may be (near) zero by cancellation; the
    floor is ``floor * max(max|reference64|, scale)`` (see the module docstring).

    Raises AssertionError (naming ``name``) when shapes differ or ``actual`` holds NaN/inf where the
    truth is finite: those are never accuracy questions.
    """
    if actual.shape != reference64.shape or reference.shape != reference64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} (reference {tuple(reference.shape)}), "
                             f"expected {tuple(reference64.shape)}")
    finite = torch.isfinite(reference64)
    bad = finite & ~torch.isfinite(actual.detach().to(torch.float64))
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the float64 reference is "
                             f"finite (first at index {tuple(bad.nonzero()[0].tolist())})")
    if floor is None:
        floor = FLOORS.get(reference.dtype, 1e-6)
    magnitude = reference64.detach().abs().max().item() if reference64.numel() else 0.0
    if scale is not None:
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"{name}: scale must be a finite number >= 0, got {scale!r}")
        magnitude = max(magnitude, scale)
    reference_error = _max_abs_diff(reference, reference64)
    allowed = factor * reference_error + floor * max(magnitude, 1e-30)
    return Comparison(name, _max_abs_diff(actual, reference64), reference_error, allowed)


def assert_close_to_reference(actual: Tensor, reference: Tensor, reference64: Tensor, *, name: str = "output",
                              factor: float = 2.0, floor: Optional[float] = None,
                              scale: Optional[float] = None) -> Comparison:
    """Assert the 2×-the-reference's-error rule (see the module docstring); returns the comparison."""
    result = compare_to_reference(actual, reference, reference64, name=name, factor=factor, floor=floor,
                                  scale=scale)
    if not result.ok:
        raise AssertionError(str(result))
    return result


def assert_gradients_close_to_reference(outs: Sequence[Tensor], refs: Sequence[Tensor], refs64: Sequence[Tensor],
                                        inputs: Sequence[Tensor], inputs64: Sequence[Tensor],
                                        names: Sequence[str]) -> None:
    """The 2× rule for every input gradient: the same random cotangents (one per output, in its dtype and on its
    device) pulled back through the fast outputs ``outs`` and the reference ``refs`` to ``inputs``, and in
    float64 through ``refs64`` to ``inputs64``; gradient i is reported as ``"d" + names[i]``."""
    cot = [torch.randn(o.shape).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cot)
    grads_ref = torch.autograd.grad(refs, inputs, cot)
    grads64 = torch.autograd.grad(refs64, inputs64, [c.double() for c in cot])
    for g, gr, g64, name in zip(grads, grads_ref, grads64, names):
        assert_close_to_reference(g, gr, g64, name="d" + name)


def group_scale(tensors) -> float:
    """max |t| over a group of tensors (Nones skipped): the natural magnitude to pass as ``scale`` for each
    member, e.g. all the gradients of one attention call (dq over one key is exactly 0, dv is not)."""
    values = [t.detach().abs().max().item() for t in tensors if t is not None and t.numel()]
    return max(values, default=0.0)


def straight_through_round(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (float64) with its value rounded to ``dtype`` but an identity gradient in float64.

    For float64 truths of ops whose definition rounds an intermediate (the gated residual x' is stored
    in x's dtype before it is normalised): ``t.to(dtype)`` would also round the gradient."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def gated_residual_adaln_float64(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                 eps: float = 1e-6, residual_dtype: Optional[torch.dtype] = None):
    """float64 truth of ``gated_residual_adaln``: x' rounded to ``residual_dtype`` (x's dtype in the op)
    as the op defines, everything else exact. Inputs are float64 tensors (leaves for autograd)."""
    from fastdit.ops.adaln import adaln_modulate_ref, per_token

    x_new = x + per_token(gate) * y
    if residual_dtype is not None:
        x_new = straight_through_round(x_new, residual_dtype)
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps)

"""Triton QK-norm + RoPE kernel through the ops it serves (qk_norm_rope, rope, rope_, rms_norm): forward
and every gradient against float64 under the 2x rule, both pair layouts, 1-D / 2-D axial / per-sample
multi-axis tables, odd sizes, strided inputs, poisoned outputs, deterministic weight gradients."""
import pytest
import torch
from torch.library import opcheck

from fastdit.kernels.qk_norm_rope import qk_norm_rope_bwd, qk_norm_rope_fwd
from fastdit.ops import (qk_norm_rope, qk_norm_rope_ref, rms_norm, rms_norm_ref, rope, rope_, rope_freqs,
                         rope_freqs_1d, rope_freqs_2d, rope_ref)
from fastdit.testing import assert_close_to_reference

SIZES = [(N, H, d) for N in (1, 7, 257) for H, d in ((1, 64), (3, 72), (24, 128))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def slow_on_cpu(N=1, **_):
    """One program per token: the interpreter's cost grows with the tokens."""
    return N > 64


def _qkv(B, N, H, d, dtype, device):
    """q, k as (B, N, H, d) views of one fused projection output, as attention produces them."""
    qkv = torch.randn(B, N, 3, H, d, device=device).to(dtype)
    return qkv[:, :, 0].requires_grad_(), qkv[:, :, 1].requires_grad_()


def _table(kind, B, N, d, device):
    if kind == "1d":
        return rope_freqs_1d(N, d, offset=5, device=device)
    if kind == "2d":
        return rope_freqs_2d(N, 1, d, device=device)
    ids = torch.randint(0, 64, (B, N, 3), device=device)  # Flux-style per-sample (t, h, w) ids
    return rope_freqs(ids, [d // 4, d // 4, d // 2])


def _check(fn, ref_fn, inputs, names):
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    outs, refs, refs64 = fn(*inputs), ref_fn(*inputs), ref_fn(*inputs64)
    outs, refs, refs64 = ((o,) if isinstance(o, torch.Tensor) else o for o in (outs, refs, refs64))
    for i, (o, r, r64) in enumerate(zip(outs, refs, refs64)):
        assert o.dtype == r.dtype
        assert_close_to_reference(o, r, r64, name=f"out{i}")
    cot = [torch.randn_like(o) for o in outs]
    for g, gr, g64, name in zip(torch.autograd.grad(outs, inputs, cot), torch.autograd.grad(refs, inputs, cot),
                                torch.autograd.grad(refs64, inputs64, [c.double() for c in cot]), names):
        assert g.dtype == gr.dtype
        assert_close_to_reference(g, gr, g64, name="d" + name)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half-split"])
@pytest.mark.parametrize("N,H,d", SIZES)
def test_qk_norm_rope_sizes(N, H, d, interleaved, device):
    q, k = _qkv(2, N, H, d, torch.bfloat16, device)
    qw, kw = (torch.randn(d, device=device).requires_grad_() for _ in range(2))
    freqs = _table("2d", 2, N, d, device)
    _check(lambda *a: qk_norm_rope(*a, freqs=freqs, interleaved=interleaved, backend="triton"),
           lambda *a: qk_norm_rope_ref(*a, freqs=freqs, interleaved=interleaved), [q, k, qw, kw],
           ["q", "k", "q_weight", "k_weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("table", ["1d", "2d", "per-sample-3axis"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half-split"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_qk_norm_rope_variants(norm, interleaved, table, dtype, device):
    q, k = _qkv(2, 11, 3, 72, dtype, device)
    freqs = _table(table, 2, 11, 72, device)
    weights = [torch.randn(72, device=device).requires_grad_() for _ in range(2)] if norm else []
    names = ["q", "k"] + (["q_weight", "k_weight"] if norm else [])
    _check(lambda q, k, *w: qk_norm_rope(q, k, *w, freqs=freqs, interleaved=interleaved, backend="triton"),
           lambda q, k, *w: qk_norm_rope_ref(q, k, *w, freqs=freqs, interleaved=interleaved), [q, k] + weights, names)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_norm_only(dtype, device):
    q, k = _qkv(2, 9, 3, 64, dtype, device)
    weights = [torch.randn(64, device=device).to(dtype).requires_grad_() for _ in range(2)]
    _check(lambda *a: qk_norm_rope(*a, backend="triton"), qk_norm_rope_ref, [q, k] + weights,
           ["q", "k", "q_weight", "k_weight"])


@pytest.mark.parametrize("shape", [(2, 9, 3, 72), (5, 128), (2, 3, 5, 2, 64)])
def test_rms_norm_op_on_the_kernel(shape, device):
    x = torch.randn(shape, device=device).to(torch.bfloat16).requires_grad_()
    w = torch.randn(shape[-1], device=device).requires_grad_()
    _check(lambda *a: rms_norm(*a, backend="triton"), rms_norm_ref, [x, w], ["x", "weight"])


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half-split"])
def test_rope_op_on_the_kernel(interleaved, inverse, device):
    x = _qkv(2, 13, 3, 72, torch.bfloat16, device)[0]
    freqs = _table("per-sample-3axis", 2, 13, 72, device)
    _check(lambda x: rope(x, freqs, interleaved, inverse, backend="triton"),
           lambda x: rope_ref(x, freqs, interleaved, inverse), [x], ["x"])


def test_rope_in_place(device):
    x = torch.randn(2, 13, 3, 72, device=device, dtype=torch.bfloat16)
    freqs = _table("2d", 2, 13, 72, device)
    want = rope(x, freqs, backend="triton")
    for backend in ("triton", "reference"):
        y = x.clone()
        assert rope_(y, freqs, backend=backend) is y
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="in-place RoPE is for inference"):
        rope_(x.clone().requires_grad_(), freqs)


def test_launchers_write_every_output_element(device):
    q, k = (t.detach() for t in _qkv(2, 13, 3, 72, torch.bfloat16, device))
    w = torch.randn(72, device=device)
    freqs = _table("2d", 2, 13, 72, device)
    for interleaved in (True, False):
        outs = qk_norm_rope_fwd(q, k, w, w, freqs, 1e-6, interleaved)
        grads = qk_norm_rope_bwd(torch.randn_like(q), torch.randn_like(k), q, k, w, w, freqs, outs[2], outs[3],
                                 interleaved)
        grads_rope = qk_norm_rope_bwd(torch.randn_like(q), None, q, None, None, None, freqs, None, None, interleaved)
        for t in (*outs, *grads, grads_rope[0]):
            assert torch.isfinite(t).all()


def test_weight_gradients_are_bitwise_deterministic(device):
    N = 1024 if device.type == "cuda" else 9  # either way several programs, so several partials
    q, k = _qkv(2, N, 4, 64, torch.bfloat16, device)
    qw, kw = (torch.randn(64, device=device).requires_grad_() for _ in range(2))
    freqs = _table("2d", 2, N, 64, device)
    outs = qk_norm_rope(q, k, qw, kw, freqs, backend="triton")
    cot = [torch.randn_like(o) for o in outs]
    first = torch.autograd.grad(outs, (q, k, qw, kw), cot, retain_graph=True)
    for _ in range(19):
        for a, b in zip(first, torch.autograd.grad(outs, (q, k, qw, kw), cot, retain_graph=True)):
            assert torch.equal(a, b)


def test_opcheck_on_the_kernel_path(device):
    q, k = _qkv(2, 3, 2, 64, torch.bfloat16, device)
    qw, kw = (torch.randn(64, device=device, requires_grad=True) for _ in range(2))
    freqs = _table("2d", 2, 3, 64, device)
    opcheck(torch.ops.fastdit.qk_norm_rope.default, (q, k, qw, kw, freqs, 1e-6, True))
    opcheck(torch.ops.fastdit.qk_norm_rope.default, (q, k, None, None, freqs, 1e-6, False))
    opcheck(torch.ops.fastdit.qk_norm_rope.default, (q, k, qw, kw, None, 1e-6, True))
    opcheck(torch.ops.fastdit.rope.default, (q, freqs, True, False))
    opcheck(torch.ops.fastdit.rms_norm.default, (q, qw, 1e-6))
    y = q.detach().clone()
    opcheck(torch.ops.fastdit.rope_.default, (y, freqs, True, False))


def test_bad_inputs(device):
    q, k = _qkv(2, 5, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="give both q_weight and k_weight"):
        qk_norm_rope(q, k, torch.ones(64, device=device))
    with pytest.raises(ValueError, match=r"k must have q's shape \(2, 5, 2, 64\)"):
        qk_norm_rope(q, k[:, :4])
    with pytest.raises(ValueError, match=r"q_weight must be \(64,\)"):
        qk_norm_rope(q, k, torch.ones(32, device=device), torch.ones(32, device=device))


def test_every_launch_configuration_computes_the_same(device):
    """Tokens per program and warps: any configuration gives the same result."""
    q, k = (t.detach() for t in _qkv(2, 13, 3, 72, torch.bfloat16, device))
    w1, w2 = (torch.randn(72, device=device) for _ in range(2))
    freqs = _table("2d", 2, 13, 72, device)
    want = qk_norm_rope_fwd(q, k, w1, w2, freqs, tokens=1)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    want_bwd = qk_norm_rope_bwd(dq, dk, q, k, w1, w2, freqs, want[2], want[3], tokens=1)
    for tokens, warps in ((1, 1), (2, 4), (3, 2), (8, 4)):
        got = qk_norm_rope_fwd(q, k, w1, w2, freqs, tokens=tokens, num_warps=warps)
        for a, b in zip(got, want):  # other warp counts reduce in another order: rounding-level differences
            atol = 1e-2 if a.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=atol)
        got = qk_norm_rope_bwd(dq, dk, q, k, w1, w2, freqs, want[2], want[3], tokens=tokens, num_warps=warps)
        for a, b in zip(got, want_bwd):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eager_fast_path_equals_the_library_op(device):
    """Eager autograd.Function and library op wrap the same implementation: bitwise equal."""
    q, k = _qkv(2, 9, 3, 64, torch.bfloat16, device)
    qw, kw = (torch.randn(64, device=device).requires_grad_() for _ in range(2))
    freqs = _table("2d", 2, 9, 64, device)
    cases = [((q, k, qw, kw), lambda: qk_norm_rope(q, k, qw, kw, freqs, backend="triton"),
              lambda: torch.ops.fastdit.qk_norm_rope(q, k, qw, kw, freqs, 1e-6, True)[:2]),
             ((q,), lambda: (rope(q, freqs, backend="triton"),),
              lambda: (torch.ops.fastdit.rope(q, freqs, True, False),)),
             ((q, qw), lambda: (rms_norm(q, qw, backend="triton"),),
              lambda: (torch.ops.fastdit.rms_norm(q, qw, 1e-6)[0],))]
    for inputs, eager_fn, library_fn in cases:
        eager, library = eager_fn(), library_fn()
        cot = [torch.randn_like(o) for o in eager]
        for a, b in zip(eager, library):
            assert torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(eager, inputs, cot), torch.autograd.grad(library, inputs, cot)):
            assert torch.equal(a, b)

"""Triton AdaLN kernels (plain and gated): forward and every gradient against float64 under the 2x rule,
odd sizes, mixed dtypes, strided inputs, poisoned outputs, deterministic backward."""
import pytest
import torch
from torch.library import opcheck

from fastdit.kernels.adaln import adaln_bwd, adaln_fwd, row_pieces
from fastdit.ops import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from fastdit.testing import assert_close_to_reference, gated_residual_adaln_float64

SIZES = [(N, D) for D in (72, 123, 1152, 3072) for N in (1, 7, 257)]
# (x dtype, modulation dtype): same dtype; bf16 activations with fp32 modulation (DiT training);
# fp32 residual with bf16 modulation and y (under bf16 autocast)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16-fp32mod", "fp32-bf16mod"]


def slow_on_cpu(N=1, D=1, **_):
    """The interpreter's cost grows with the elements here (rows are blocked per program)."""
    return N * D > 257 * 123


def _inputs(B, N, D, x_dtype, mod_dtype, per_token, device, gated):
    mshape = (B, N, D) if per_token else (B, D)
    x = (torch.randn(B, N, D, device=device) * 2 + 0.3).to(x_dtype)
    mods = [(torch.randn(mshape, device=device) * 0.5).to(mod_dtype) for _ in range(3 if gated else 2)]
    y = [torch.randn(B, N, D, device=device).to(mod_dtype)] if gated else []
    return [t.requires_grad_() for t in [x] + y + mods]


def _check(fn, ref_fn, inputs, names, truth_fn=None):
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    outs, refs, refs64 = fn(*inputs), ref_fn(*inputs), (truth_fn or ref_fn)(*inputs64)
    outs, refs, refs64 = ((o,) if isinstance(o, torch.Tensor) else o for o in (outs, refs, refs64))
    for i, (o, r, r64) in enumerate(zip(outs, refs, refs64)):
        assert o.dtype == r.dtype and o.is_contiguous()
        assert_close_to_reference(o, r, r64, name=f"out{i}")
    cot = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cot)
    grads_ref = torch.autograd.grad(refs, inputs, cot)
    grads64 = torch.autograd.grad(refs64, inputs64, [c.double() for c in cot])
    for g, gr, g64, name in zip(grads, grads_ref, grads64, names):
        assert g.dtype == gr.dtype
        assert_close_to_reference(g, gr, g64, name="d" + name)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("N,D", SIZES)
def test_adaln_modulate_sizes(N, D, per_token, device):
    inputs = _inputs(2, N, D, torch.bfloat16, torch.float32, per_token, device, gated=False)
    _check(lambda *a: adaln_modulate(*a, backend="triton"), adaln_modulate_ref, inputs, ["x", "shift", "scale"])


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("N,D", SIZES)
def test_gated_residual_adaln_sizes(N, D, per_token, device):
    inputs = _inputs(2, N, D, torch.bfloat16, torch.float32, per_token, device, gated=True)
    _check_gated(inputs)


def _check_gated(inputs):
    """The float64 truth rounds x' to x's dtype, as the op defines (see gated_residual_adaln_float64)."""
    x_dtype = inputs[0].dtype
    _check(lambda *a: gated_residual_adaln(*a, backend="triton"), gated_residual_adaln_ref, inputs,
           ["x", "y", "gate", "shift", "scale"],
           truth_fn=lambda *a: gated_residual_adaln_float64(*a, residual_dtype=x_dtype))


@pytest.mark.parametrize("x_dtype,mod_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_dtypes(x_dtype, mod_dtype, gated, device):
    inputs = _inputs(3, 37, 123, x_dtype, mod_dtype, False, device, gated)
    if gated:
        _check_gated(inputs)
    else:
        _check(lambda *a: adaln_modulate(*a, backend="triton"), adaln_modulate_ref, inputs, ["x", "shift", "scale"])


def test_strided_inputs_and_gradients(device):
    """x transposed, modulation as chunks of one AdaLN projection (row stride 6D), an expanded
    (stride-0) output gradient: the kernels read strides and write contiguous outputs."""
    B, N, D = 2, 9, 72
    x = torch.randn(B, D, N, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    y = torch.randn(B, N, 2 * D, device=device, dtype=torch.bfloat16)[..., ::2].requires_grad_()
    ada = torch.randn(B, 6 * D, device=device, requires_grad=True)
    shift, scale, gate = ada[:, :D], ada[:, 2 * D:3 * D], ada[:, 4 * D:5 * D]
    assert not x.is_contiguous() and not y.is_contiguous() and not shift.is_contiguous()
    _check_gated([x, y, gate, shift, scale])
    out = adaln_modulate(x, shift, scale, backend="triton")
    ref = adaln_modulate_ref(x, shift, scale)
    g = torch.autograd.grad(out.sum(), (x, ada))  # d(sum)/d(out) is an expanded scalar: all strides 0
    g_ref = torch.autograd.grad(ref.sum(), (x, ada))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_launchers_write_every_output_element(device):
    """With outputs poisoned (conftest), any element left unwritten would be NaN."""
    for per_token in (False, True):
        x, shift, scale = (t.detach() for t in _inputs(3, 37, 123, torch.bfloat16, torch.float32, per_token,
                                                       device, gated=False))
        outs = adaln_fwd(x, shift, scale, 1e-6)
        outs += adaln_bwd(torch.randn_like(x), x, shift, scale, outs[1], outs[2])
        y, gate = torch.randn_like(x), torch.randn_like(shift)
        gated = adaln_fwd(x, shift, scale, 1e-6, res=y, gate=gate)
        outs += gated + adaln_bwd(torch.randn_like(x), gated[0], shift, scale, gated[2], gated[3], res=y, gate=gate,
                                  dx_new=torch.randn_like(x))
        for t in outs:
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_backward_is_bitwise_deterministic(gated, device):
    """The per-sample reductions use fixed-order partial sums: 20 backward passes are bitwise equal."""
    N = 600 if device.type == "cuda" else 37  # several chunks per sample either way
    inputs = _inputs(2, N, 1152 if device.type == "cuda" else 123, torch.bfloat16, torch.float32, False, device, gated)
    fn = (lambda *a: gated_residual_adaln(*a, backend="triton")) if gated else \
        (lambda *a: adaln_modulate(*a, backend="triton"))
    outs = fn(*inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    cot = [torch.randn_like(o) for o in outs]
    first = torch.autograd.grad(outs, inputs, cot, retain_graph=True)
    for _ in range(19):
        again = torch.autograd.grad(outs, inputs, cot, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_empty_inputs(device):
    x = torch.randn(2, 0, 72, device=device)
    shift, scale = torch.randn(2, 72, device=device, requires_grad=True), torch.randn(2, 72, device=device)
    out = adaln_modulate(x, shift, scale, backend="triton")
    assert out.shape == (2, 0, 72)
    (dshift,) = torch.autograd.grad(out.sum(), shift)
    assert torch.equal(dshift, torch.zeros_like(dshift))


@pytest.mark.parametrize("per_token", [False, True])
def test_opcheck_on_the_kernel_path(per_token, device):
    x, shift, scale = _inputs(2, 5, 72, torch.bfloat16, torch.float32, per_token, device, gated=False)
    opcheck(torch.ops.fastdit.adaln_modulate.default, (x, shift, scale, 1e-6))
    x, y, gate, shift, scale = _inputs(2, 5, 72, torch.bfloat16, torch.float32, per_token, device, gated=True)
    opcheck(torch.ops.fastdit.gated_residual_adaln.default, (x, y, gate, shift, scale, 1e-6))


def test_row_pieces_cover_the_row_with_fewer_masked_lanes():
    assert row_pieces(1152) == (1024, 128) and row_pieces(3072) == (2048, 1024) and row_pieces(1536) == (1024, 512)
    assert row_pieces(72) == (64, 8) and row_pieces(4096) == (4096, 0)
    assert row_pieces(123) == (128, 0) and row_pieces(123, split=True) == (64, 64)
    for D in range(1, 300):
        head, tail = row_pieces(D)
        assert head + tail >= D and head + tail <= 2 * D and (tail == 0 or head < D)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_every_launch_configuration_computes_the_same(gated, device):
    """Rows per step, row blocks per program (with prefetch), chunking of the backward: any
    configuration the tuning script can pick gives the reference's result."""
    x, *rest = (t.detach() for t in _inputs(2, 37, 123, torch.bfloat16, torch.float32, False, device, gated))
    y, gate = (rest[0], rest[1]) if gated else (None, None)
    shift, scale = rest[-2], rest[-1]
    extra = dict(res=y, gate=gate) if gated else {}
    want = adaln_fwd(x, shift, scale, 1e-6, **extra)
    # split=True holds a row of 123 as 64 + a 64-wide tail of which 59 columns are real
    for block_m, steps, warps, split in ((1, 1, 4, None), (4, 3, 2, True), (2, 8, 8, False), (1, 1, 4, True)):
        got = adaln_fwd(x, shift, scale, 1e-6, block_m=block_m, steps=steps, num_warps=warps, split=split, **extra)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-2 if a.dtype == torch.bfloat16 else 1e-5)
    dout = torch.randn_like(x)
    x_norm, mean, rstd = (want[0], want[2], want[3]) if gated else (x, want[1], want[2])
    bwd_extra = dict(res=y, gate=gate, dx_new=torch.randn_like(x)) if gated else {}
    ref = adaln_bwd(dout, x_norm, shift, scale, mean, rstd, **bwd_extra)
    for block_m, pps, min_rows in ((1, 1, 1), (4, 16, 1), (2, 4, 16)):
        got = adaln_bwd(dout, x_norm, shift, scale, mean, rstd, block_m=block_m, programs_per_sm=pps,
                        min_rows=min_rows, **bwd_extra)
        for a, b in zip(got, ref):
            atol = 2e-2 if a.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_eager_fast_path_equals_the_library_op(gated, device):
    """Eager calls go through an autograd.Function, torch.compile through the library op: both wrap the
    same implementation, so outputs and gradients agree bitwise."""
    inputs = _inputs(2, 9, 72, torch.bfloat16, torch.float32, False, device, gated)
    if gated:
        eager = gated_residual_adaln(*inputs, backend="triton")
        library = torch.ops.fastdit.gated_residual_adaln(*inputs, 1e-6)[:2]
    else:
        eager = (adaln_modulate(*inputs, backend="triton"),)
        library = (torch.ops.fastdit.adaln_modulate(*inputs, 1e-6)[0],)
    cot = [torch.randn_like(o) for o in eager]
    for a, b in zip(eager, library):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(eager, inputs, cot), torch.autograd.grad(library, inputs, cot)):
        assert torch.equal(a, b)

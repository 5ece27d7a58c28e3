"""fp8_linear: the quantisers bit for bit against a float64 formula; the reference against an independent float64
formula; the fast path (torch._scaled_mm, which runs on CPU too) and every gradient against the float64
reference under the 2x rule, for each recipe; x_fp8; autocast; the backend switch; errors; and the error of FP8
itself against a plain float64 linear."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastdit.ops import RECIPES, Fp8Recipe, dequantize, fp8_linear, fp8_linear_ref, quantize_rows, quantize_tensor
from fastdit.ops.fp8_linear import (EPS, _alignment_reason, fast_path_reason, fp8_linear_ref_backward,
                                    fp8_linear_ref_forward)
from fastdit.testing import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
E4M3 = torch.float8_e4m3fn
EPS32 = torch.tensor(EPS, dtype=torch.float32).item()  # the clamp as the quantisers apply it (fp32)


def assert_bits_equal(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    bad = got.view(torch.uint8) != want.view(torch.uint8) if got.element_size() == 1 else got != want
    assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} elements differ"


def fmax(dtype):
    return torch.finfo(dtype).max


# --------------------------------------------------------------------------------------------- quantisers

@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_bitwise_with_power_of_two_scales(dtype, fp8):
    """Each row's amax is fmax * 2^e: the scale is exactly 2^e, every quotient is exact, so the data must be the
    float64 formula's bits, subnormals and ties included."""
    R, C = 6, 37
    exps = torch.randint(-20, 21, (R, 1)).double()
    t = (torch.randn(R, C, dtype=torch.float64) * fmax(fp8) / 8).clamp(-fmax(fp8) / 2, fmax(fp8) / 2)
    t[torch.arange(R), torch.randint(0, C, (R,))] = fmax(fp8) * torch.where(torch.rand(R) < 0.5, -1.0, 1.0).double()
    t = (t * 2.0 ** exps).to(dtype)
    data, scale = quantize_rows(t, fp8)
    assert scale.dtype == torch.float32 and scale.shape == (R, 1)
    assert torch.equal(scale.double(), 2.0 ** exps)
    want = (t.double() / scale.double()).clamp(-fmax(fp8), fmax(fp8)).to(fp8)
    assert_bits_equal(data, want, "data")


@pytest.mark.parametrize("fp8", FP8)
def test_quantize_tensor_bitwise_with_a_power_of_two_scale(fp8):
    t = (torch.randn(9, 40, dtype=torch.float64) * fmax(fp8) / 8).clamp(-fmax(fp8) / 2, fmax(fp8) / 2)
    t[4, 7] = -fmax(fp8)
    t = (t * 2.0 ** -9).to(torch.bfloat16)
    data, scale = quantize_tensor(t, fp8)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == 2.0 ** -9
    assert_bits_equal(data, (t.double() / 2.0 ** -9).to(fp8), "data")


def assert_float64_formula(t, data, scale, fp8, rowwise):
    """scale == fp32(max(amax, EPS) / fmax) bit for bit (fp32's division, like float64's rounded to fp32, is
    correctly rounded); data == the float64 formula's RNE cast, except where the exact quotient lies within
    fp32 rounding of a tie between two fp8 neighbours (the op divides in fp32): there one step apart."""
    t64 = t.double()
    amax = t64.abs().amax(dim=1, keepdim=True) if rowwise else t64.abs().amax()
    want_scale = (amax.clamp(min=EPS32) / fmax(fp8)).float()
    assert_bits_equal(scale, want_scale, "scale")
    q64 = (t64 / scale.double()).clamp(-fmax(fp8), fmax(fp8))
    want = q64.to(fp8)
    differ = data.view(torch.uint8) != want.view(torch.uint8)
    if differ.any():
        got, exp, q = data.double()[differ], want.double()[differ], q64[differ]
        assert ((q - (got + exp) / 2).abs() <= 2.0 ** -22 * q.abs()).all(), "data differs away from a tie"


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantizers_against_the_float64_formula(dtype, fp8):
    t = (torch.randn(33, 70) * torch.exp(3 * torch.randn(33, 1))).to(dtype)
    data, scale = quantize_rows(t, fp8)
    assert data.dtype == fp8 and data.shape == t.shape and scale.shape == (33, 1)
    assert_float64_formula(t, data, scale, fp8, rowwise=True)
    data, scale = quantize_tensor(t, fp8)
    assert data.dtype == fp8 and scale.shape == ()
    assert_float64_formula(t, data, scale, fp8, rowwise=False)


@pytest.mark.parametrize("fp8", FP8)
def test_all_zero_rows(fp8):
    t = torch.randn(5, 48, dtype=torch.bfloat16)
    t[0] = 0
    t[3] = 0
    data, scale = quantize_rows(t, fp8)
    zero_scale = torch.tensor(EPS32 / fmax(fp8), dtype=torch.float32)
    assert torch.equal(scale[[0, 3], 0], zero_scale.expand(2))
    assert (data[[0, 3]].float() == 0).all() and (data[[1, 2, 4]].float() != 0).any()
    assert (dequantize(data, scale)[[0, 3]] == 0).all()
    data, scale = quantize_tensor(torch.zeros(3, 16), fp8)
    assert torch.equal(scale, zero_scale) and (data.float() == 0).all()
    # through the op: a zero token gives exactly the bias
    x, w, b = torch.randn(4, 32), torch.randn(48, 32), torch.randn(48)
    x[2] = 0
    assert torch.equal(fp8_linear(x, w, b, backend="triton")[2], b)


@pytest.mark.parametrize("fp8", FP8)
def test_saturation_and_extreme_rows(fp8):
    """The row max lands on ±fmax exactly, never on NaN/inf, at any magnitude; rows below EPS quantise to 0."""
    t = torch.randn(6, 64)
    t[1] *= 1e30
    t[2] *= 3e38 / t[2].abs().max()  # near fp32's max
    t[3] *= 1e-10  # small, above EPS
    t[4] = torch.linspace(-1e4, 1e4, 64)
    t[5] *= 1e-30  # amax below EPS
    data, scale = quantize_rows(t, fp8)
    d = data.float()
    assert torch.isfinite(d).all()
    assert torch.equal(d[:5].abs().amax(dim=1), torch.full((5,), fmax(fp8)))
    assert (d[5] == 0).all()
    # an amax whose fp32 scale rounds down, so that fp32(amax / scale) > fmax: saturated, not NaN
    found = 0
    for i in range(1, 4000):
        amax = torch.tensor(1.0 + i * 2.0 ** -23, dtype=torch.float32) * 1000
        if (amax / (amax / fmax(fp8))).item() > fmax(fp8):
            data, _ = quantize_rows(torch.stack([amax, -amax]).view(1, 2), fp8)
            assert data.float().tolist() == [[fmax(fp8), -fmax(fp8)]]
            found += 1
    assert found


def test_dequantize():
    data, scale = quantize_rows(torch.randn(7, 32))
    assert torch.equal(dequantize(data, scale, torch.float64), data.double() * scale.double())
    assert torch.equal(dequantize(data, scale), (data.double() * scale.double()).float())
    assert dequantize(data, scale, torch.bfloat16).dtype == torch.bfloat16
    d, s = quantize_tensor(torch.randn(3, 16))
    assert torch.equal(dequantize(d.t(), s, torch.float64), d.t().double() * s.item())


def test_quantizer_errors():
    with pytest.raises(ValueError, match=r"quantize_rows takes a 2-D tensor, got \(2, 3, 4\)"):
        quantize_rows(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="quantize_rows takes a floating-point tensor"):
        quantize_rows(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError,
                       match="fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got torch.bfloat16"):
        quantize_tensor(torch.randn(2, 3), torch.bfloat16)


# ------------------------------------------------------------------------------- the reference, independently

def q_independent(t, fp8, rowwise):
    """Quantisation written out: scale = max(amax, eps) / fmax (fp32), data = RNE(sat(t / scale))."""
    t = t.float()
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = amax.clamp(min=1e-12) / torch.full((), fmax(fp8), device=t.device)  # a tensor: IEEE on CUDA too
    return (t / scale).clamp(-fmax(fp8), fmax(fp8)).to(fp8).double() * scale.double()


def truth_independent(x, w, b, dy, recipe):
    """float64 y, dx, dw, db of an FP8 linear, from the recipe's description."""
    r = RECIPES[recipe]
    rw, g = r.scaling == "rowwise", r.grad_dtype
    K, N = w.shape[1], w.shape[0]
    X, dY = x.reshape(-1, K), dy.reshape(-1, N)
    y = q_independent(X, E4M3, rw) @ q_independent(w, E4M3, rw).T  # X per row, W per output channel
    y = y + (0 if b is None else b.double())
    dx = q_independent(dY, g, rw) @ q_independent(w.T, E4M3, rw).T  # dY per row, W per column
    if r.weight_grad == "high":
        dw = dY.double().T @ X.to(dy.dtype).double()
    else:
        dw = q_independent(dY.T, g, rw) @ q_independent(X.T, E4M3, rw).T  # dY, X per column
    db = None if b is None else dY.double().sum(0)
    return y.view(*x.shape[:-1], N), dx.view(x.shape), dw, db


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_an_independent_float64_formula(recipe, with_bias):
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 48, requires_grad=True)
    b = torch.randn(32, requires_grad=True) if with_bias else None
    y = fp8_linear_ref(x, w, b, recipe=recipe)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y64, dx64, dw64, db64 = truth_independent(x.detach(), w.detach(), None if b is None else b.detach(), dy, recipe)
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fp8_linear_ref_forward(x, w, b, recipe=recipe), y64, **close)
    got = fp8_linear_ref_backward(dy, x, w, b, recipe=recipe)
    for name, g, want in zip(("dx", "dw", "db"), got, (dx64, dw64, db64)):
        if want is None:
            assert g is None
        else:
            torch.testing.assert_close(g, want, **close, msg=name)
    # the differentiable reference: the same numbers, cast to the inputs' dtypes
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    assert torch.equal(y, y64.to(y.dtype))
    for g, want, t in zip(grads, (dx64, dw64, db64), leaves):
        assert g.dtype == t.dtype and torch.equal(g, want.to(t.dtype))


# ------------------------------------------------------------------------------- the fast path vs float64

def make(lead, K, N, dtype, wdtype, with_bias, device="cpu"):
    x = torch.randn(*lead, K, device=device).to(dtype).requires_grad_()
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(wdtype).requires_grad_()
    b = torch.randn(N, device=device).to(wdtype).requires_grad_() if with_bias else None
    return x, w, b


def check_fast_against_reference(x, w, b, recipe, x_fp8=None, backend="triton", compute_dtype=None):
    """fast y and gradients vs the float64 reference, allowed 2x the error of the reference computed in the
    output dtype (dequantised operands in it, multiplied in it). Returns (y, grads)."""
    y = fp8_linear(x, w, b, recipe=recipe, x_fp8=x_fp8, backend=backend)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    lowp = compute_dtype or y.dtype
    y64 = fp8_linear_ref_forward(x, w, b, recipe=recipe, x_fp8=x_fp8)
    y_lp = fp8_linear_ref_forward(x, w, b, recipe=recipe, x_fp8=x_fp8, compute_dtype=lowp)
    assert_close_to_reference(y, y_lp, y64, name=f"{recipe} y")
    g64 = [g for g in fp8_linear_ref_backward(dy, x, w, b, recipe=recipe) if g is not None]
    g_lp = [g for g in fp8_linear_ref_backward(dy, x, w, b, recipe=recipe, compute_dtype=lowp) if g is not None]
    for name, g, t, lp, ref in zip(("dx", "dw", "db"), grads, leaves, g_lp, g64):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close_to_reference(g, lp.to(g.dtype), ref, name=f"{recipe} {name}")
    return y, grads


SIZES = [((1,), 32, 48), ((7,), 48, 32), ((113,), 1152, 48), ((113,), 32, 1152), ((2, 7), 48, 32),
         ((2, 8), 32, 16)]  # the last: M = 16, no wgrad padding
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead,K,N", SIZES)
@pytest.mark.parametrize("dtype,wdtype", DTYPES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fast_path_and_gradients_match_float64(recipe, dtype, wdtype, lead, K, N, with_bias):
    x, w, b = make(lead, K, N, dtype, wdtype, with_bias)
    y, _ = check_fast_against_reference(x, w, b, recipe)
    assert y.dtype == dtype and y.shape == (*lead, N)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,wdtype", DTYPES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cpu_builds_without_rowwise_scaled_mm_emulate_it(recipe, dtype, wdtype, with_bias, monkeypatch):
    """torch 2.11's CPU _scaled_mm takes per-tensor scales only: there the row-wise GEMMs multiply the same fp8
    operands in fp32 and scale after. Forced here (the probe's answer replaced) and held to the same 2x rule."""
    module = importlib.import_module("fastdit.ops.fp8_linear")  # the package exports the function by that name

    monkeypatch.setitem(module._CPU_ROWWISE, "cpu", False)
    native = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: native.append(k) or _real_scaled_mm(*a, **k))
    x, w, b = make((2, 7), 48, 32, dtype, wdtype, with_bias)
    check_fast_against_reference(x, w, b, recipe)
    assert all(k["scale_a"].numel() == 1 and k["scale_b"].numel() == 1 for k in native), \
        "a row-wise scale reached torch._scaled_mm"
    assert bool(native) == (recipe == "tensorwise")


def test_the_cpu_rowwise_probe_answers_for_this_build():
    module = importlib.import_module("fastdit.ops.fp8_linear")  # the package exports the function by that name

    module._CPU_ROWWISE.clear()
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        works = bool((_real_scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                                      out_dtype=torch.float32) == 16).all())
    except RuntimeError:
        works = False
    assert module._cpu_rowwise_scaled_mm() is works


_real_scaled_mm = torch._scaled_mm


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cpu_takes_sizes_that_are_not_multiples_of_16(recipe):
    assert fast_path_reason(torch.randn(7, 17), torch.randn(33, 17)) is None
    check_fast_against_reference(*make((7,), 17, 33, torch.bfloat16, torch.float32, True), recipe)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cpu_fast_path_is_within_2x_of_the_rounded_float64_reference(recipe):
    """On CPU, _scaled_mm is as accurate as one rounding of the float64 result (a tighter check than the rule
    above): compared with fp8_linear_ref, the float64 math rounded once to the output and gradient dtypes."""
    x, w, b = make((113,), 1152, 48, torch.bfloat16, torch.bfloat16, True)
    y = fp8_linear(x, w, b, recipe=recipe, backend="triton")
    y_ref = fp8_linear_ref(x, w, b, recipe=recipe)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    assert_close_to_reference(y, y_ref, fp8_linear_ref_forward(x, w, b, recipe=recipe), name="y")
    for name, g, g_ref, g64 in zip(("dx", "dw", "db"), grads, grads_ref,
                                   fp8_linear_ref_backward(dy, x, w, b, recipe=recipe)):
        assert_close_to_reference(g, g_ref, g64, name=name)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_autocast_bf16_on_cpu(recipe):
    """fp32 activations and master weights under bf16 autocast: a bf16 output, fp32 gradients; x and weight
    are quantised from their fp32 values."""
    x, w, b = make((3, 37), 48, 32, torch.float32, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = check_fast_against_reference(x, w, b, recipe, compute_dtype=torch.bfloat16)
        assert fp8_linear_ref(x, w, b, recipe=recipe).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.float32] * 3


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_saves_x_in_the_output_dtype(backend):
    """Under bf16 autocast an fp32 x is kept for the backward in bf16, as autocast's own Linear keeps its bf16
    copy: FP8 mode must not hold twice the activation memory of the bf16 model it replaces."""
    x, w, b = make((5, 7), 48, 32, torch.float32, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(x, w, b, backend=backend)
    assert ((35, 48), torch.bfloat16) in saved and ((35, 48), torch.float32) not in saved, saved
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_non_contiguous_inputs_and_deterministic_backward():
    xb, wb = torch.randn(48, 21), torch.randn(48, 32)  # x = xb.t() (21, 48), weight = wb.t() (32, 48)
    x, w = xb.t().requires_grad_(), wb.t().requires_grad_()
    xc, wc = xb.t().contiguous().requires_grad_(), wb.t().contiguous().requires_grad_()
    for recipe in RECIPES:
        y = fp8_linear(x, w, recipe=recipe, backend="triton")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w), dy)
        yc = fp8_linear(xc, wc, recipe=recipe, backend="triton")
        gc1 = torch.autograd.grad(yc, (xc, wc), dy, retain_graph=True)
        gc2 = torch.autograd.grad(yc, (xc, wc), dy)
        assert torch.equal(y, yc)
        for a, b_, c in zip(grads, gc1, gc2):
            assert torch.equal(a, b_) and torch.equal(b_, c)


def test_only_the_needed_gradients():
    x, w, b = make((7,), 32, 48, torch.bfloat16, torch.float32, True)
    x.requires_grad_(False)
    y = fp8_linear(x, w, b, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad is None and w.grad is not None and b.grad is not None
    x2 = x.detach().requires_grad_()
    assert torch.equal(torch.autograd.grad(fp8_linear(x2, w, b, backend="triton"), w, dy)[0], w.grad)


def test_traces_under_torch_compile_fullgraph():
    """The autograd Function around _scaled_mm traces with no graph break (aot_eager: the tracing, without
    Inductor's C++ compile on CPU) and computes the eager bits, forward and backward."""
    x, w, b = make((2, 7), 32, 48, torch.bfloat16, torch.float32, True)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, b: fp8_linear(x, w, b, recipe="rowwise"), fullgraph=True, backend="aot_eager")
    y = fn(x, w, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    y_eager = fp8_linear(x, w, b, recipe="rowwise")
    assert torch.equal(y, y_eager)
    for g, g_eager in zip(grads, torch.autograd.grad(y_eager, (x, w, b), dy)):
        assert torch.equal(g, g_eager)


def test_empty_tokens_take_the_reference():
    w = torch.randn(48, 32, requires_grad=True)
    x = torch.randn(0, 32, requires_grad=True)
    assert fast_path_reason(x, w) == "x or weight is empty"
    y = fp8_linear(x, w)
    assert y.shape == (0, 48)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and (w.grad == 0).all()


# ------------------------------------------------------------------------------------------------- x_fp8

@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_hp_wgrad"])
def test_x_fp8_is_what_the_op_would_quantise(recipe):
    x, w, b = make((2, 7), 48, 32, torch.bfloat16, torch.float32, True)
    data, scale = quantize_rows(x.detach().reshape(-1, 48))
    dy = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    y = fp8_linear(x, w, b, recipe=recipe, backend="triton")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    for x_fp8 in [(data, scale), (data.view(2, 7, 48), scale.view(2, 7, 1))]:
        for op in (fp8_linear, fp8_linear_ref):
            y_given = op(x, w, b, recipe=recipe, x_fp8=x_fp8)
            assert torch.equal(y_given, y if op is fp8_linear else fp8_linear_ref(x, w, b, recipe=recipe))
        y_given = fp8_linear(x, w, b, recipe=recipe, x_fp8=x_fp8, backend="triton")
        for g, g_given in zip(grads, torch.autograd.grad(y_given, (x, w, b), dy)):
            assert torch.equal(g, g_given)
    check_fast_against_reference(x, w, b, recipe, x_fp8=(data, scale))


def test_x_fp8_is_used_instead_of_x():
    x, w = torch.randn(7, 32), torch.randn(48, 32)
    data, scale = quantize_rows(x)
    doubled = fp8_linear(x, w, x_fp8=(data, scale * 2), backend="triton")  # scales by 2: exact
    assert torch.equal(doubled, 2 * fp8_linear(x, w, backend="triton"))


def test_x_fp8_errors():
    x, w = torch.randn(2, 7, 32), torch.randn(48, 32)
    data, scale = quantize_rows(x.reshape(14, 32))
    cases = [
        (dict(x_fp8=(data, scale), recipe="tensorwise"), "x_fp8 is x quantised per row; recipe scaling 'tensorwise'"),
        (dict(x_fp8=data), "x_fp8 must be a pair \\(data, scale\\) of tensors, got Tensor"),
        (dict(x_fp8=(data.float(), scale)), "x_fp8 data must be torch.float8_e4m3fn, got torch.float32"),
        (dict(x_fp8=(data.to(torch.float8_e5m2), scale)), "x_fp8 data must be torch.float8_e4m3fn"),
        (dict(x_fp8=(data[:13], scale[:13])),
         r"x_fp8 data must be shaped as x \(2, 7, 32\) or \(14, 32\), got \(13, 32\)"),
        (dict(x_fp8=(data, scale.double())), "x_fp8 scale must be torch.float32, got torch.float64"),
        (dict(x_fp8=(data, scale.view(14))),
         r"x_fp8 scale must be \(14, 1\) for data \(14, 32\) \(one scale per row\), got \(14\)"),
        (dict(x_fp8=(data.view(2, 7, 32), scale)), r"x_fp8 scale must be \(2, 7, 1\)"),
    ]
    for kwargs, message in cases:
        for op in (fp8_linear, fp8_linear_ref):
            with pytest.raises(ValueError, match=message):
                op(x, w, **kwargs)


# ------------------------------------------------------------------------------------ backends and errors

def test_backend_switch(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    x, w, b = make((7,), 32, 48, torch.bfloat16, torch.bfloat16, True)
    dy = torch.randn(7, 48, dtype=torch.bfloat16)

    y_ref = fp8_linear(x, w, b, backend="reference")
    g_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    assert not calls
    y = fp8_linear_ref(x, w, b, backend="triton")  # accepted, ignored
    assert torch.equal(y, y_ref) and not calls
    for g, g2 in zip(g_ref, torch.autograd.grad(y, (x, w, b), dy)):
        assert torch.equal(g, g2)

    y_auto = fp8_linear(x, w, b)  # CPU, bf16: the fast path
    torch.autograd.grad(y_auto, (x, w, b), dy)
    assert len(calls) == 3  # forward, dgrad, wgrad
    assert torch.equal(y_auto, fp8_linear(x, w, b, backend="triton"))

    calls.clear()
    x64, w64 = x.detach().double(), w.detach().double()
    assert fp8_linear(x64, w64).dtype == torch.float64 and not calls  # "auto": the reference
    with pytest.raises(ValueError, match="fp8_linear: backend='triton' cannot run these inputs: x is torch.float64, "
                                         "weight torch.float64, output torch.float64"):
        fp8_linear(x64, w64, backend="triton")


def test_fast_path_reasons():
    meta = torch.randn(4, 32, device="meta"), torch.randn(48, 32, device="meta")
    assert fast_path_reason(*meta) == "x is on meta; torch._scaled_mm's FP8 GEMMs run on CUDA and CPU"
    assert _alignment_reason(1152, 4608) is None
    assert _alignment_reason(72, 48) == ("in (K) = 72 not a multiple of 16; torch._scaled_mm on CUDA needs K and "
                                         "N multiples of 16")
    assert _alignment_reason(20, 33).startswith("in (K) = 20, out (N) = 33 not a multiple of 16")


def test_bad_inputs_raise_clear_errors():
    for op in (fp8_linear, fp8_linear_ref):
        with pytest.raises(ValueError, match=r"x's last dimension must be weight's in = 32, got x \(4, 31\)"):
            op(torch.randn(4, 31), torch.randn(48, 32))
        with pytest.raises(ValueError, match=r"bias must be \(out,\) = \(48,\), got \(32\)"):
            op(torch.randn(4, 32), torch.randn(48, 32), torch.randn(32))
        with pytest.raises(ValueError, match=r"weight must be 2-D \(out, in\), got \(32\)"):
            op(torch.randn(4, 32), torch.randn(32))
        with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
            op(torch.ones(4, 32, dtype=torch.long), torch.randn(48, 32))
        with pytest.raises(ValueError, match="unknown recipe 'fp8'; choose one of rowwise, rowwise_hp_wgrad, "
                                             "tensorwise or pass an Fp8Recipe"):
            op(torch.randn(4, 32), torch.randn(48, 32), recipe="fp8")
    with pytest.raises(ValueError, match="Fp8Recipe.scaling must be one of rowwise, tensorwise, got 'blockwise'"):
        Fp8Recipe(scaling="blockwise")
    with pytest.raises(ValueError, match="Fp8Recipe.grad_dtype must be torch.float8_e4m3fn or torch.float8_e5m2"):
        Fp8Recipe(grad_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Fp8Recipe.weight_grad must be one of fp8, high, got 'bf16'"):
        Fp8Recipe(weight_grad="bf16")


def test_recipes_and_custom_recipe():
    assert RECIPES["rowwise"] == Fp8Recipe("rowwise", torch.float8_e4m3fn, "fp8")
    assert RECIPES["rowwise_hp_wgrad"] == Fp8Recipe("rowwise", torch.float8_e4m3fn, "high")
    assert RECIPES["tensorwise"] == Fp8Recipe("tensorwise", torch.float8_e5m2, "fp8")
    x, w = torch.randn(7, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    custom = Fp8Recipe("tensorwise", torch.float8_e4m3fn, "high")
    check_fast_against_reference(x, w, None, custom)
    assert torch.equal(fp8_linear(x, w, recipe=RECIPES["rowwise"]), fp8_linear(x, w, recipe="rowwise"))


# --------------------------------------------------------------------------------- FP8 against plain linear

# Relative Frobenius error against F.linear in float64 on Gaussian inputs (no bias: it would dilute the
# error). e4m3 rounds each operand to 4 significant bits (relative error <= 2^-4, about 2% rms), e5m2 to 3:
# measured at most 0.037 (e4m3 GEMMs) and 0.060 (dY in e5m2) over 20 seeds at (128, 256) -> 192.
BOUNDS = {torch.float8_e4m3fn: 0.05, torch.float8_e5m2: 0.1}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp8_error_against_a_plain_float64_linear(recipe):
    r = RECIPES[recipe]
    x = torch.randn(128, 256, requires_grad=True)
    w = (torch.randn(192, 256) / 16).requires_grad_()
    y = fp8_linear(x, w, recipe=recipe, backend="triton")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y, y64) < BOUNDS[E4M3]
    assert rel(dx, dx64) < BOUNDS[r.grad_dtype]
    assert rel(dw, dw64) < (1e-5 if r.weight_grad == "high" else BOUNDS[r.grad_dtype])
    assert rel(y, y64) > 1e-3  # it did quantise
    assert math.isfinite(rel(dw, dw64))


# ------------------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                          reason="torch._scaled_mm needs CUDA with compute capability >= 8.9")


@cuda
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("lead,K,N", [((7,), 48, 32), ((2, 113), 1152, 48)])
def test_cuda_fast_path_matches_float64(recipe, lead, K, N):
    x, w, b = make(lead, K, N, torch.bfloat16, torch.float32, True, device="cuda")
    check_fast_against_reference(x, w, b, recipe)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x32, w32, b32 = make(lead, K, N, torch.float32, torch.float32, True, device="cuda")
        check_fast_against_reference(x32, w32, b32, recipe, compute_dtype=torch.bfloat16)


@cuda
def test_cuda_unaligned_sizes_take_the_reference():
    x, w = torch.randn(7, 20, device="cuda"), torch.randn(48, 20, device="cuda")
    assert "in (K) = 20 not a multiple of 16" in fast_path_reason(x, w)
    torch.testing.assert_close(fp8_linear(x, w), fp8_linear_ref(x, w), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in \\(K\\) = 20 not a multiple of 16"):
        fp8_linear(x, w, backend="triton")

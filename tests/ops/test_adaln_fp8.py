"""adaln_modulate_fp8 / gated_residual_adaln_fp8: LN-modulate (plain or gated) that also emits its output
quantised to FP8 per row. The fp8 outputs must be the per-row quantisation of ``out`` as stored, bit for bit
(an independent formula here); ``out`` and every gradient are those of the non-fp8 ops (2x rule against
float64); the kernel's own round-to-nearest-even onto the fp8 grid matches torch's cast, ties included."""
import os

import pytest
import torch

from fastdit.kernels import _utils
from fastdit.ops.adaln_fp8 import (adaln_modulate_fp8, adaln_modulate_fp8_ref, gated_residual_adaln_fp8,
                                   gated_residual_adaln_fp8_ref)
from fastdit.testing import (assert_close_to_reference, assert_gradients_close_to_reference,
                             gated_residual_adaln_float64)

EPS = 1e-6
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def quantized_rows(out, fp8_dtype, amax_eps=1e-12):
    """Independent per-row quantisation: scale = max(amax, eps) / fmax in fp32, data = RNE(sat(out / scale))."""
    rows = out.reshape(-1, out.shape[-1]).float()
    fmax = torch.finfo(fp8_dtype).max
    # divided by a tensor: CUDA torch divides by a Python scalar through its (inexact) reciprocal
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=amax_eps) / torch.full((), fmax, device=rows.device)
    data = (rows / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return data.view(out.shape), scale.view(*out.shape[:-1], 1)


def assert_bits_equal(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    bad = got.view(torch.uint8) != want.view(torch.uint8) if got.element_size() == 1 else got != want
    assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} elements differ"


def assert_same_as_plain_kernel(got, want, name):
    """The fp8 kernel's ``out`` against the plain kernel's: the same bits under the interpreter. Compiled for a
    GPU the two are different programs, and the compiler may contract ``xhat * (1 + scale) + shift`` into an FMA
    in one and not the other (seen on H100: fp32 outputs 1 ulp apart), so there they agree to one rounding of
    the output dtype. The fp8 outputs are then checked against the ``out`` this kernel stored, bit for bit."""
    if got.device.type == "cpu":
        assert_bits_equal(got, want, name)
        return
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps * want.float().abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def make(B, N, D, per_token, dtype, mod_dtype=None, gated=False, requires_grad=False, device="cpu"):
    mshape = (B, N, D) if per_token else (B, D)
    x = (3 * torch.randn(B, N, D)).to(device, dtype)
    mods = [torch.randn(mshape).to(device, mod_dtype or dtype) for _ in range(3 if gated else 2)]
    inputs = [x] + ([torch.randn(B, N, D).to(device, mod_dtype or dtype)] if gated else []) + mods
    return [t.requires_grad_(requires_grad) for t in inputs]


@pytest.fixture
def poisoned():
    """Every kernel output starts as NaN: an element the kernel forgets to write cannot pass."""
    _utils.POISON_OUTPUTS = True
    yield
    _utils.POISON_OUTPUTS = False


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("B,N,D,per_token", [(2, 7, 72, False), (1, 5, 1152, False), (3, 3, 123, True),
                                             (1, 1, 48, False)])
@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.float16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_fp8_outputs_are_the_row_quantisation_of_out_bit_for_bit(B, N, D, per_token, dtype, mod_dtype, gated,
                                                                  fp8_dtype, device, poisoned):
    inputs = make(B, N, D, per_token, dtype, mod_dtype, gated, device=device)
    if gated:
        x_new, out, out_q, q_scale = gated_residual_adaln_fp8(*inputs, EPS, fp8_dtype=fp8_dtype, backend="triton")
        from fastdit.ops import gated_residual_adaln
        x_new_plain, out_plain = gated_residual_adaln(*inputs, EPS, backend="triton")
        assert_same_as_plain_kernel(x_new, x_new_plain, "x_new")
    else:
        out, out_q, q_scale = adaln_modulate_fp8(*inputs, EPS, fp8_dtype=fp8_dtype, backend="triton")
        from fastdit.ops import adaln_modulate
        out_plain = adaln_modulate(*inputs, EPS, backend="triton")
    assert_same_as_plain_kernel(out, out_plain, "out")  # the epilogue changes nothing the plain kernel writes
    want_q, want_scale = quantized_rows(out, fp8_dtype)
    assert_bits_equal(q_scale, want_scale, "q_scale")
    assert_bits_equal(out_q, want_q, "out_q")
    assert q_scale.shape == (B, N, 1) and q_scale.dtype == torch.float32


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("gated", [False, True])
def test_reference_quantises_its_own_output(gated, fp8_dtype):
    inputs = make(2, 7, 72, False, torch.bfloat16, torch.float32, gated)
    ref = gated_residual_adaln_fp8_ref if gated else adaln_modulate_fp8_ref
    *_, out, out_q, q_scale = ref(*inputs, EPS, fp8_dtype=fp8_dtype)
    want_q, want_scale = quantized_rows(out, fp8_dtype)
    assert_bits_equal(out_q, want_q, "out_q")
    assert_bits_equal(q_scale, want_scale, "q_scale")


def test_zero_rows_and_saturating_values(device):
    """A row of zeros (amax clamped to the epsilon: data 0), and rows whose values reach the format's max."""
    x = torch.randn(1, 4, 64, device=device)
    shift = torch.zeros(1, 4, 64, device=device)
    scale = torch.full((1, 4, 64), -1.0, device=device)  # (1 + scale) = 0: out = shift
    shift[0, 1] = torch.linspace(-1e4, 1e4, 64)
    shift[0, 2, 5] = 3.0
    out, out_q, q_scale = adaln_modulate_fp8(x, shift, scale, EPS, backend="triton")
    want_q, want_scale = quantized_rows(out, torch.float8_e4m3fn)
    assert_bits_equal(out_q, want_q, "out_q")
    assert_bits_equal(q_scale, want_scale, "q_scale")
    assert (out_q[0, 0].float() == 0).all() and q_scale[0, 0, 0].item() == pytest.approx(1e-12 / 448)
    assert out_q[0, 1].float().abs().max().item() == 448.0


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.float16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_out_and_every_gradient_follow_the_2x_rule(gated, dtype, mod_dtype, device):
    """Gradients flow through out (the FP8 GEMM's backward sends its gradient there), not the fp8 outputs."""
    inputs = make(2, 7, 72, True, dtype, mod_dtype, gated, requires_grad=True, device=device)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    if gated:
        x_new, out, out_q, _ = gated_residual_adaln_fp8(*inputs, EPS, backend="triton")
        x_new_ref, out_ref, _, _ = gated_residual_adaln_fp8_ref(*inputs, EPS)
        outs, refs = (x_new, out), (x_new_ref, out_ref)
        refs64 = gated_residual_adaln_float64(*inputs64, residual_dtype=dtype)
        names = ("x", "y", "gate", "shift", "scale")
    else:
        out, out_q, _ = adaln_modulate_fp8(*inputs, EPS, backend="triton")
        out_ref, _, _ = adaln_modulate_fp8_ref(*inputs, EPS)
        outs, refs = (out,), (out_ref,)
        x64, shift64, scale64 = inputs64
        refs64 = (torch.nn.functional.layer_norm(x64, (72,), eps=EPS) * (1 + scale64) + shift64,)
        names = ("x", "shift", "scale")
    assert not out_q.requires_grad
    for o, r, r64 in zip(outs, refs, refs64):
        assert_close_to_reference(o, r, r64, name="out")
    assert_gradients_close_to_reference(outs, refs, refs64, inputs, inputs64, names)


@pytest.mark.parametrize("gated", [False, True])
def test_library_op_traces_and_differentiates(gated):
    """The fastdit:: op (what torch.compile sees): its outputs equal the entry's, gradcheck in float64."""
    inputs = make(2, 3, 5, True, torch.float64, gated=gated, requires_grad=True)
    op = torch.ops.fastdit.gated_residual_adaln_fp8 if gated else torch.ops.fastdit.adaln_modulate_fp8

    def fn(*args):
        outs = op(*args, EPS, "e4m3")
        return outs[:2] if gated else outs[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))
    outs = op(*[t.detach() for t in inputs], EPS, "e4m3")
    assert outs[-2].dtype == torch.float8_e4m3fn and outs[-1].shape == (2, 3, 1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="opcheck of the kernel path needs the GPU or Triton's interpreter")
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck(gated, device):
    from torch.library import opcheck
    inputs = make(2, 5, 24, False, torch.bfloat16, torch.float32, gated, requires_grad=True, device=device)
    op = torch.ops.fastdit.gated_residual_adaln_fp8 if gated else torch.ops.fastdit.adaln_modulate_fp8
    # opcheck's aot_dispatch test sums every output, and torch has no sum for float8 tensors: the three
    # checks that apply (schema, autograd registration, fake tensor against the real kernel) run
    opcheck(op.default, (*inputs, EPS, "e4m3"),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_fp8_dtype_raises_a_clear_error():
    x, shift, scale = make(1, 2, 16, False, torch.float32)
    with pytest.raises(ValueError, match="fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got "
                                         "torch.float16"):
        adaln_modulate_fp8(x, shift, scale, fp8_dtype=torch.float16)
    with pytest.raises(ValueError, match="shift must be"):
        adaln_modulate_fp8(x, shift[:, :8], scale)

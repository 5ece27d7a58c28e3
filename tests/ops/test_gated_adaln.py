"""gated_residual_adaln: x' = x + gate*y, then LN(x')*(1+scale)+shift."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdit.ops import adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from fastdit.ops.gated_adaln import gated_residual_adaln_backward_ref
from fastdit.testing import (assert_close_to_reference, assert_gradients_close_to_reference,
                             gated_residual_adaln_float64)

EPS = 1e-6
NAMES = ("x", "y", "gate", "shift", "scale")


def independent(x, y, gate, shift, scale, eps=EPS):
    if gate.dim() == 2:
        gate, shift, scale = gate[:, None], shift[:, None], scale[:, None]
    x_new = x.double() + gate.double() * y.double()
    out = F.layer_norm(x_new, (x.shape[-1],), eps=eps) * (1 + scale.double()) + shift.double()
    return x_new, out


def make(B, N, D, per_token, dtype=torch.float32, mod_dtype=None, requires_grad=False, device="cpu"):
    """x in ``dtype``; y and the modulation in ``mod_dtype`` (the autocast case: fp32 x, bf16 rest)."""
    mshape = (B, N, D) if per_token else (B, D)
    x = torch.randn(B, N, D).to(device, dtype)
    y = torch.randn(B, N, D).to(device, mod_dtype or dtype)
    mods = [torch.randn(mshape).to(device, mod_dtype or dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in (x, y, *mods)]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("B,N,D", [(2, 1, 72), (2, 7, 123), (2, 113, 72)])
def test_reference_matches_independent_float64(B, N, D, per_token):
    inputs = make(B, N, D, per_token, torch.float64)
    for got, want in zip(gated_residual_adaln_ref(*inputs), independent(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_out_is_adaln_of_the_stored_residual():
    """In low precision, LN runs on x' as rounded to x's dtype: out == adaln_modulate(x') exactly."""
    x, y, gate, shift, scale = make(2, 7, 123, False, torch.bfloat16, torch.float32)
    y = y.bfloat16()
    x_new, out = gated_residual_adaln_ref(x, y, gate, shift, scale)
    assert x_new.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out, adaln_modulate_ref(x_new, shift, scale), rtol=0, atol=0)


@pytest.mark.parametrize("per_token", [False, True])
def test_explicit_backward_matches_autograd_float64(per_token):
    inputs = make(2, 7, 72, per_token, torch.float64, requires_grad=True)
    x_new, out = independent(*inputs)
    dx_new, dout = torch.randn_like(x_new), torch.randn_like(out)
    expected = torch.autograd.grad((x_new, out), inputs, (dx_new, dout))
    xn = x_new.detach()
    mean, rstd = xn.mean(-1), torch.rsqrt(xn.var(-1, unbiased=False) + EPS)
    got = gated_residual_adaln_backward_ref(dx_new, dout, xn, *(t.detach() for t in inputs[1:]), mean, rstd)
    for g, e, name in zip(got, expected, NAMES):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("impl", ["reference", "library_op"])
def test_gradcheck_every_input(per_token, impl):
    inputs = make(2, 3, 5, per_token, torch.float64, requires_grad=True)
    if impl == "reference":
        fn = gated_residual_adaln_ref
    else:
        def fn(*args):
            return torch.ops.fastdit.gated_residual_adaln(*args, EPS)[:2]
    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                             (torch.float16, None), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("per_token", [False, True])
def test_backend_triton_forward_and_gradients_follow_the_2x_rule(dtype, mod_dtype, per_token, device):
    inputs = make(2, 7, 72, per_token, dtype, mod_dtype, requires_grad=True, device=device)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    outs = gated_residual_adaln(*inputs, backend="triton")
    refs = gated_residual_adaln_ref(*inputs)
    refs64 = gated_residual_adaln_float64(*inputs64, residual_dtype=dtype)  # x' rounded as the op defines
    for o, r, r64, name in zip(outs, refs, refs64, ("x_new", "out")):
        assert_close_to_reference(o, r, r64, name=name)
    assert_gradients_close_to_reference(outs, refs, refs64, inputs, inputs64, NAMES)


def test_unused_residual_output_still_differentiates():
    inputs = make(2, 5, 24, False, torch.float64, requires_grad=True)
    _, out = torch.ops.fastdit.gated_residual_adaln(*inputs, EPS)[:2]
    grads = torch.autograd.grad(out.sum(), inputs)
    _, out_ref = gated_residual_adaln_ref(*inputs)
    for g, e in zip(grads, torch.autograd.grad(out_ref.sum(), inputs)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("per_token", [False, True])
def test_opcheck(per_token, device):
    inputs = make(2, 5, 24, per_token, torch.bfloat16, torch.float32, requires_grad=True, device=device)
    opcheck(torch.ops.fastdit.gated_residual_adaln.default, (*inputs, EPS))


def test_bad_inputs_raise_clear_errors():
    x, y, gate, shift, scale = make(2, 7, 72, False)
    with pytest.raises(ValueError, match=r"y must have x's shape \(2, 7, 72\), got \(2, 6, 72\)"):
        gated_residual_adaln(x, y[:, :6], gate, shift, scale)
    with pytest.raises(ValueError, match="gate must be"):
        gated_residual_adaln(x, y, gate[:1], shift, scale)

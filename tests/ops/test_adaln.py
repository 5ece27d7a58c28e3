"""adaln_modulate: reference vs an independent float64 formulation, explicit backward, library op."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdit.backend import use_backend
from fastdit.ops import adaln_modulate, adaln_modulate_backward_ref, adaln_modulate_ref
from fastdit.testing import assert_close_to_reference

EPS = 1e-6
SIZES = [(2, 1, 72), (2, 7, 123), (3, 113, 72), (1, 7, 123)]


def independent(x, shift, scale, eps=EPS):
    """float64 LayerNorm via F.layer_norm, then the DiT modulate."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return F.layer_norm(x.double(), (x.shape[-1],), eps=eps) * (1 + scale.double()) + shift.double()


def make(B, N, D, per_token, dtype=torch.float32, mod_dtype=None, requires_grad=False, device="cpu"):
    mshape = (B, N, D) if per_token else (B, D)
    x = (torch.randn(B, N, D) * 3 + 0.5).to(device, dtype)
    shift, scale = (torch.randn(mshape).to(device, mod_dtype or dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (x, shift, scale)]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("B,N,D", SIZES)
def test_reference_matches_layer_norm_in_float64(B, N, D, per_token):
    x, shift, scale = make(B, N, D, per_token, torch.float64)
    torch.testing.assert_close(adaln_modulate_ref(x, shift, scale), independent(x, shift, scale),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float16, None), (torch.bfloat16, torch.float32)])
def test_reference_low_precision_is_one_rounding_from_truth(dtype, mod_dtype):
    x, shift, scale = make(2, 113, 123, False, dtype, mod_dtype)
    out = adaln_modulate_ref(x, shift, scale)
    assert out.dtype == dtype
    truth = independent(x, shift, scale)
    # float32 math then one rounding to the output dtype: half an ulp of the output plus float32
    # rounding of the intermediates, which can be larger than the output itself (cancellation).
    err = (out.double() - truth).abs().max().item()
    assert err <= 4 * torch.finfo(dtype).eps * truth.abs().max().item()


def test_non_contiguous_input_gives_the_same_result():
    x = torch.randn(2, 72, 7).transpose(1, 2)  # (2, 7, 72), strided
    shift, scale = torch.randn(2, 3, 72)[:, 1], torch.randn(2, 72)
    assert not x.is_contiguous() and not shift.is_contiguous()
    torch.testing.assert_close(adaln_modulate_ref(x, shift, scale),
                               adaln_modulate_ref(x.contiguous(), shift.contiguous(), scale))


@pytest.mark.parametrize("per_token", [False, True])
def test_explicit_backward_matches_autograd_float64(per_token):
    x, shift, scale = make(2, 7, 72, per_token, torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    expected = torch.autograd.grad(independent(x, shift, scale), (x, shift, scale), dy)
    xd = x.detach()
    mean = xd.mean(-1)
    rstd = torch.rsqrt(xd.var(-1, unbiased=False) + EPS)
    got = adaln_modulate_backward_ref(dy, xd, shift.detach(), scale.detach(), mean, rstd)
    for g, e, name in zip(got, expected, ("dx", "dshift", "dscale")):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("impl", ["reference", "library_op"])
def test_gradcheck_every_input(per_token, impl):
    x, shift, scale = make(2, 3, 5, per_token, torch.float64, requires_grad=True)
    if impl == "reference":
        fn = adaln_modulate_ref
    else:
        def fn(x, shift, scale):
            return torch.ops.fastdit.adaln_modulate(x, shift, scale, EPS)[0]
    assert torch.autograd.gradcheck(fn, (x, shift, scale))
    assert torch.autograd.gradgradcheck(adaln_modulate_ref, (x, shift, scale)) if impl == "reference" else True


@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                             (torch.float16, None), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("per_token", [False, True])
def test_backend_triton_forward_and_gradients_follow_the_2x_rule(dtype, mod_dtype, per_token, device):
    x, shift, scale = make(2, 7, 123, per_token, dtype, mod_dtype, requires_grad=True, device=device)
    x64, shift64, scale64 = (t.detach().double().requires_grad_() for t in (x, shift, scale))
    dy = torch.randn(x.shape).to(device, dtype)
    out = adaln_modulate(x, shift, scale, backend="triton")
    ref = adaln_modulate_ref(x, shift, scale)
    ref64 = adaln_modulate_ref(x64, shift64, scale64)
    assert_close_to_reference(out, ref, ref64, name="y")
    grads = torch.autograd.grad(out, (x, shift, scale), dy)
    grads_ref = torch.autograd.grad(ref, (x, shift, scale), dy)
    grads64 = torch.autograd.grad(ref64, (x64, shift64, scale64), dy.double())
    for g, gr, g64, name in zip(grads, grads_ref, grads64, ("dx", "dshift", "dscale")):
        assert g.dtype == gr.dtype
        assert_close_to_reference(g, gr, g64, name=name)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype,mod_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_opcheck(per_token, dtype, mod_dtype, device):
    """On the GPU the op is a triton_op: opcheck's fake and AOT-dispatch checks trace the kernel launches."""
    x, shift, scale = make(2, 5, 24, per_token, dtype, mod_dtype, requires_grad=True, device=device)
    opcheck(torch.ops.fastdit.adaln_modulate.default, (x, shift, scale, EPS))
    x_strided = torch.randn(2, 24, 5, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    opcheck(torch.ops.fastdit.adaln_modulate.default, (x_strided, shift, scale, EPS))


def test_backends_agree(device):
    x, shift, scale = make(2, 7, 72, False, device=device)
    ref = adaln_modulate(x, shift, scale, backend="reference")
    for backend in ("auto", "triton"):
        torch.testing.assert_close(adaln_modulate(x, shift, scale, backend=backend), ref)
    with use_backend("triton"):
        torch.testing.assert_close(adaln_modulate(x, shift, scale), ref)


@pytest.mark.parametrize("bad,match", [
    (lambda x, s, c: (x[0], s, c), r"x must be 3-D \(B, N, D\), got shape \(7, 72\)"),
    (lambda x, s, c: (x, s[:, :70], c), r"shift must be \(B, D\) = \(2, 72\) or \(B, N, D\)"),
    (lambda x, s, c: (x, s, c[:, None].expand(2, 7, 72)), "use one form for all"),
    (lambda x, s, c: (x.long(), s, c), "floating-point"),
    (lambda x, s, c: (x, s.to("meta"), c), "one device"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    x, shift, scale = make(2, 7, 72, False)
    for fn in (adaln_modulate_ref, adaln_modulate):
        with pytest.raises(ValueError, match=match):
            fn(*bad(x, shift, scale))


def test_triton_backend_names_why_it_cannot_run(monkeypatch, device):
    x, shift, scale = make(2, 7, 72, False, torch.float64, device=device)
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: .*x has dtype torch.float64"):
        adaln_modulate(x, shift, scale, backend="triton")
    # auto falls back quietly for the same inputs
    torch.testing.assert_close(adaln_modulate(x, shift, scale, backend="auto"), adaln_modulate_ref(x, shift, scale))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="tensors are on cpu; Triton kernels run on CUDA"):
        adaln_modulate(x.float().cpu(), shift.float().cpu(), scale.float().cpu(), backend="triton")

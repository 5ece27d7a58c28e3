"""rms_norm (per-head QK-norm): reference vs torch's RMSNorm in float64, backward, library op."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdit.ops import rms_norm, rms_norm_backward_ref, rms_norm_ref
from fastdit.testing import assert_close_to_reference

EPS = 1e-6


@pytest.mark.parametrize("shape", [(2, 1, 3, 72), (2, 7, 2, 64), (1, 113, 1, 128), (5, 123)])
def test_reference_matches_torch_rms_norm_float64(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2
    w = torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(rms_norm_ref(x, w), F.rms_norm(x, (shape[-1],), w, eps=EPS), rtol=1e-12, atol=1e-12)


def test_explicit_backward_matches_autograd_float64():
    x = torch.randn(2, 7, 3, 72, dtype=torch.float64, requires_grad=True)
    w = torch.randn(72, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    expected = torch.autograd.grad(F.rms_norm(x, (72,), w, eps=EPS), (x, w), dy)
    rstd = torch.rsqrt(x.detach().square().mean(-1) + EPS)
    got = rms_norm_backward_ref(dy, x.detach(), w.detach(), rstd)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "library_op"])
def test_gradcheck_every_input(impl):
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = rms_norm_ref if impl == "reference" else (lambda x, w: torch.ops.fastdit.rms_norm(x, w, EPS)[0])
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
def test_backend_triton_forward_and_gradients_follow_the_2x_rule(dtype, w_dtype, device):
    x = torch.randn(2, 7, 3, 72).to(device, dtype).requires_grad_()
    w = torch.randn(72).to(device, w_dtype).requires_grad_()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    out, ref, ref64 = rms_norm(x, w, backend="triton"), rms_norm_ref(x, w), rms_norm_ref(x64, w64)
    assert_close_to_reference(out, ref, ref64, name="y")
    dy = torch.randn(x.shape).to(device, dtype)
    for g, gr, g64, name in zip(torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(ref, (x, w), dy),
                                torch.autograd.grad(ref64, (x64, w64), dy.double()), ("dx", "dweight")):
        assert_close_to_reference(g, gr, g64, name=name)


def test_opcheck_including_strided_heads(device):
    qkv = torch.randn(2, 5, 3, 2, 16, dtype=torch.bfloat16, device=device)
    q = qkv[:, :, 0].requires_grad_()  # (B, N, H, d) view of a fused projection, as in attention
    w = torch.randn(16, device=device, requires_grad=True)
    opcheck(torch.ops.fastdit.rms_norm.default, (q, w, EPS))
    opcheck(torch.ops.fastdit.rms_norm.default, (qkv.unbind(2)[1], w, EPS))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"weight must be 1-D with x's last dimension \(8\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="cannot run these inputs: .*x has dtype torch.float64"):
        rms_norm(x.double(), torch.ones(8, dtype=torch.float64), backend="triton")

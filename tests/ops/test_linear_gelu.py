"""linear_gelu: the reference against float64, the backend switch, and on a GPU the cuBLASLt GELU epilogue
against the reference (the 2x rule against float64), forward only, also under autocast and torch.compile."""
import pytest
import torch

from fastdit.ops import linear_gelu, linear_gelu_ref
from fastdit.testing import assert_close_to_reference


def independent(x, w, b):
    """float64 tanh-GELU written out."""
    z = x.double() @ w.double().T + (0 if b is None else b.double())
    return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 17), (1, 1, 1, 17)])
def test_reference_matches_float64_formula(shape, with_bias):
    x = torch.randn(*shape, dtype=torch.float64)
    w, b = torch.randn(33, 17, dtype=torch.float64), torch.randn(33, dtype=torch.float64) if with_bias else None
    torch.testing.assert_close(linear_gelu_ref(x, w, b), independent(x, w, b), rtol=1e-12, atol=1e-12)


def test_cpu_and_gradients_take_the_reference():
    x, w, b = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(6)
    out = linear_gelu(x, w, b)
    torch.testing.assert_close(out, linear_gelu_ref(x, w, b), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match="linear_gelu: backend='triton' cannot run these inputs: x is on cpu"):
        linear_gelu(x, w, b, backend="triton")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"x's last dimension must be weight's in = 8, got x \(4, 7\)"):
        linear_gelu(torch.randn(4, 7), torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"bias must be \(out,\) = \(6,\), got \(5\)"):
        linear_gelu(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_gelu(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        linear_gelu(torch.ones(4, 8, dtype=torch.long), torch.randn(6, 8))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogue needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_epilogue_matches_the_reference_on_cuda(dtype, with_bias):
    x = torch.randn(2, 77, 72, device="cuda")
    w = torch.randn(200, 72, device="cuda") / 72 ** 0.5
    b = torch.randn(200, device="cuda") if with_bias else None
    lowp = [t if t is None else t.to(dtype) for t in (x, w, b)]
    with torch.no_grad():
        fast = linear_gelu(*lowp, backend="triton")
        ref = linear_gelu_ref(*lowp)
    assert fast.dtype == dtype and fast.shape == (2, 77, 200)
    assert_close_to_reference(fast, ref, independent(x, w, b), name=f"linear_gelu {dtype}")


@cuda
def test_epilogue_under_autocast_and_compile():
    x, b = torch.randn(64, 72, device="cuda"), torch.randn(200, device="cuda")
    w = torch.randn(200, 72, device="cuda") / 8
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    fn = torch.compile(lambda x: linear_gelu(x, w, b), fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = linear_gelu(x, w, b)
        ref = linear_gelu_ref(x, w, b)
        compiled, code = run_and_get_code(fn, x)
    assert eager.dtype == torch.bfloat16 and compiled.dtype == torch.bfloat16
    assert "_addmm_activation" in "\n".join(code)
    assert_close_to_reference(eager, ref, independent(x, w, b), name="autocast eager")
    assert_close_to_reference(compiled, ref, independent(x, w, b), name="autocast compiled")

import math
from fractions import Fraction

import pytest
import torch
import triton
import triton.language as tl

from fastdit.kernels import _utils


@triton.jit
def _convert_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, _utils.to_dtype_rtne(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3.4e38 -> fp16 inf, on purpose
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_downcast_rounds_to_nearest_even_like_torch(dtype, device):
    special = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-9, 3.3895e38, 3.4e38, -3.4e38,
                            float("inf"), float("-inf"), float("nan"), 1e-40, -1e-39, 65504.0, 65520.0])
    x = torch.cat([special, torch.randn(4000) * 10.0 ** torch.randint(-8, 8, (4000,))]).to(device)
    y = torch.empty(x.numel(), dtype=dtype, device=device)
    _convert_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    same = (y == want) | (y.isnan() & want.isnan())
    if device.type == "cpu":  # the interpreter mangles float32 subnormal inputs (< 1.2e-38) on its own
        same |= x.abs() < torch.finfo(torch.float32).tiny
    assert same.all(), (x[~same][:5], y[~same][:5], want[~same][:5])


def test_sum_chunks_is_a_fixed_order_sum(device):
    partials = torch.randn(3, 4, 7, 5, device=device)
    outs = [torch.empty(4, 5, device=device, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    _utils.sum_chunks(partials, outs)
    for k, out in enumerate(outs):
        torch.testing.assert_close(out.float(), partials[k].sum(1).to(out.dtype).float())


def test_sum_chunks_two_stage_path_for_many_chunks(device):
    partials = torch.randn(2, 1, 1000, 40, device=device)
    outs = [torch.empty(40, device=device) for _ in range(2)]
    _utils.sum_chunks(partials, outs)
    for k, out in enumerate(outs):
        torch.testing.assert_close(out, partials[k, 0].double().sum(0).float(), rtol=1e-5, atol=1e-4)


def test_host_sizing_helpers_match_the_definitions():
    """_utils.cdiv / next_pow2 (plain Python on the launch path) against the definitions, exactly."""
    for n in list(range(0, 70)) + [1023, 1024, 1025, 4608, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        power = 1
        while power < n:
            power *= 2
        assert _utils.next_pow2(n) == power, n
        for d in (1, 2, 3, 7, 64, 1000):
            assert _utils.cdiv(n, d) == (n + d - 1) // d == math.ceil(Fraction(n, d)), (n, d)

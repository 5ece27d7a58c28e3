"""The accuracy rule itself must be able to fail."""
import pytest
import torch

from fastdit.testing import (FLOORS, assert_close_to_reference, assert_gradients_close_to_reference,
                             compare_to_reference)


def _truth_and_lowp(dtype, n=1000):
    truth = torch.randn(n, dtype=torch.float64)
    return truth, truth.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_same_dtype_reference_passes(dtype):
    truth, lowp = _truth_and_lowp(dtype)
    result = assert_close_to_reference(lowp.clone(), lowp, truth)
    assert result.error == result.reference_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_three_times_the_reference_error_fails(dtype):
    truth, lowp = _truth_and_lowp(dtype)
    base = (lowp.double() - truth).abs().max().item()
    worse = truth + 3 * base * torch.sign(torch.randn_like(truth))  # float64: error exactly 3x
    with pytest.raises(AssertionError, match="FAIL"):
        assert_close_to_reference(worse, lowp, truth, floor=0.0)


def test_floor_admits_tiny_error_when_reference_is_exact():
    truth = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    exact = truth.to(torch.bfloat16)
    nudged = exact.double() * (1 + FLOORS[torch.bfloat16] / 8)
    assert compare_to_reference(nudged, exact, truth).ok
    assert not compare_to_reference(truth * 1.1, exact, truth).ok


def test_nan_and_shape_mismatch_fail_loudly():
    truth, lowp = _truth_and_lowp(torch.float32, 10)
    bad = lowp.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference(bad, lowp, truth, name="y")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(lowp[:5], lowp, truth)


def test_zero_truth_uses_the_given_scale_not_its_own_zero():
    """An output that cancels to exactly 0 (dq of attention over one key): both computations return
    rounding noise; the floor must come from the output's natural scale, or a pass is luck."""
    truth = torch.zeros(16, dtype=torch.float64)
    reference = torch.full((16,), 1e-7, dtype=torch.float32)  # the same-dtype reference's noise
    noise = torch.full((16,), 7e-7, dtype=torch.float32)     # another summation order's noise: 7x
    assert not compare_to_reference(noise, reference, truth).ok  # the old rule: a coin toss
    assert compare_to_reference(noise, reference, truth, scale=1.0).ok
    # the scale only lifts the floor: a real error at that scale still fails
    assert not compare_to_reference(torch.full((16,), 1e-2), reference, truth, scale=1.0).ok


def test_group_scale_and_bad_scale():
    from fastdit.testing import group_scale

    assert group_scale([torch.zeros(3), None, torch.tensor([-2.0, 1.0])]) == 2.0
    assert group_scale([]) == 0.0
    with pytest.raises(ValueError, match="scale"):
        compare_to_reference(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.float64), scale=float("nan"))


class _WrongGradient(torch.autograd.Function):
    """x * w with dw off by one part in a thousand: far beyond one float32 rounding."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy * w, dy * x * 1.001


def test_gradients_rule_passes_a_right_backward_and_names_a_wrong_one():
    x, w = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert_gradients_close_to_reference([x * w], [x * w], [x64 * w64], [x, w], [x64, w64], ("x", "w"))
    with pytest.raises(AssertionError, match="dw"):
        assert_gradients_close_to_reference([_WrongGradient.apply(x, w)], [x * w], [x64 * w64], [x, w], [x64, w64],
                                            ("x", "w"))

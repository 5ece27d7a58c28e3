"""Power-law fits: known a, b, c come back from noisy synthetic points, the confidence intervals cover the
truth about as often as they claim, the frontier is the lowest value at each compute, and degenerate
inputs are refused with a message saying why."""
import math

import numpy as np
import pytest

from fastdit.scaling.fit import FitError, compute_frontier, fit_power_law

A, B, C_FLOOR = 750.0, 0.3, 0.2  # L spans ~1.7 .. 0.29 over 1e9 .. 1e13 FLOPs


def _points(rng, n=12, noise=0.02):
    compute = np.geomspace(1e9, 1e13, n)
    loss = (A * compute ** -B + C_FLOOR) * np.exp(noise * rng.standard_normal(n))
    return compute, loss


def test_fit_recovers_known_parameters_from_noisy_points():
    compute, loss = _points(np.random.default_rng(1))
    fit = fit_power_law(compute, loss)
    assert fit.n == 12 and fit.r2 > 0.98
    assert abs(fit.b - B) < 0.06 and abs(fit.c - C_FLOOR) < 0.04
    assert abs(math.log(fit.a / A)) < 1.0  # a is loosely determined (it is the amplitude at C = 1 FLOP)
    for name, truth in (("a", A), ("b", B), ("c", C_FLOOR)):
        lo, hi = getattr(fit, f"{name}_ci")
        assert lo <= truth <= hi, name
    assert np.allclose(fit.predict(compute), A * compute ** -B + C_FLOOR, rtol=0.05)
    d = fit.to_dict()
    assert d["ci_method"].startswith("covariance") and len(d["b_ci"]) == 2 and d["formula"]


def test_fit_is_exact_without_noise_and_invariant_to_compute_units():
    compute = np.geomspace(1e3, 1e6, 8)
    loss = 4.0 * compute ** -0.5 + 0.05
    fit = fit_power_law(compute, loss)
    assert fit.b == pytest.approx(0.5, rel=1e-4) and fit.c == pytest.approx(0.05, rel=1e-3)
    assert fit.a == pytest.approx(4.0, rel=1e-3) and fit.r2 == pytest.approx(1.0, abs=1e-9)
    in_peta = fit_power_law(compute / 1e15, loss)  # the same points in other units: same b and c
    assert in_peta.b == pytest.approx(fit.b, rel=1e-4) and in_peta.c == pytest.approx(fit.c, rel=1e-3)


def test_confidence_intervals_cover_the_truth_at_about_their_level():
    rng = np.random.default_rng(7)
    covered = {"a": 0, "b": 0, "c": 0}
    trials = 150
    for _ in range(trials):
        fit = fit_power_law(*_points(rng, n=10, noise=0.03), confidence=0.9)
        for name, truth in (("a", A), ("b", B), ("c", C_FLOOR)):
            lo, hi = getattr(fit, f"{name}_ci")
            covered[name] += lo <= truth <= hi
    for name, count in covered.items():
        assert 0.8 <= count / trials <= 0.98, (name, count / trials)  # nominal 0.9


def test_three_points_fit_without_intervals_and_say_so():
    fit = fit_power_law([1e9, 1e10, 1e11], [1.0, 0.6, 0.45])
    assert fit.b_ci is None and fit.a_ci is None and fit.c_ci is None
    assert any("no confidence interval" in note for note in fit.notes)


@pytest.mark.parametrize("compute,loss,message", [
    ([1e9, 1e10], [1.0, 0.5], "at least 3"),
    ([1e9, 1e10, 1e11], [1.0, 0.5], "differ in length"),
    ([1e9, 1e10, 1e11, 1e12], [1.0, float("nan"), 0.4, 0.3], "finite"),
    ([1e9, 1e10, 1e11, 1e12], [1.0, float("inf"), 0.4, 0.3], "finite"),
    ([1e9, 0.0, 1e11, 1e12], [1.0, 0.6, 0.4, 0.3], "> 0"),
    ([1e9, 1e10, 1e11, 1e12], [1.0, -0.6, 0.4, 0.3], "> 0"),
    ([1e9, 1e9, 1e10, 1e10], [1.0, 0.9, 0.5, 0.4], "distinct compute"),
    ([1e9, 1e10, 1e11, 1e12], [0.5, 0.5, 0.5, 0.5], "same"),
    ([1e9, 1e10, 1e11], ["x", 0.5, 0.4], "numbers"),
])
def test_degenerate_inputs_raise_a_clear_error(compute, loss, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(compute, loss)


def test_bad_confidence_is_refused():
    with pytest.raises(FitError, match="confidence"):
        fit_power_law([1e9, 1e10, 1e11, 1e12], [1.0, 0.6, 0.4, 0.3], confidence=1.5)


def test_frontier_keeps_the_lowest_value_at_each_compute():
    compute = [1, 2, 2, 3, 4, 5, 6]
    loss = [1.0, 0.8, 0.7, 0.9, 0.6, float("nan"), 0.6]
    # 1 (first), 2 at compute 2 (the lower of the two), 4 (0.6); 3 is worse than 0.7, 6 ties 0.6 at more compute
    assert compute_frontier(compute, loss) == [0, 2, 4]
    assert compute_frontier([], []) == []

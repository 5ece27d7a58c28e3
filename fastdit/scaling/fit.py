"""Power-law fits of a figure (loss, FD) against training compute: ``L(C) = a * C^(-b) + c``.

The fit is made in log space: it minimises ``sum (log L_i - log(a C_i^-b + c))^2`` (each point's relative
error counts the same, whether the loss is 2.0 or 0.02), with ``a > 0`` (as ``log a``), ``b`` free and
``c >= 0`` (an irreducible floor). Compute is divided by its geometric mean ``C0`` first, so the problem is
well conditioned whatever the units; ``a`` is reported in the caller's units (``a = a0 * C0^b``, with
``a0`` the amplitude at ``C0``, also reported). The start point comes from a profile over ``c`` (for fixed
``c``, ``log(L - c)`` is linear in ``log C``), then :func:`scipy.optimize.curve_fit` (trust-region
reflective, bounded) refines it.

Confidence intervals come from the fit's covariance (the Jacobian at the optimum, scaled by the residual
variance ``SSR / (n - 3)``) with Student-t quantiles on ``n - 3`` degrees of freedom: ``b`` and ``c`` are
symmetric (``c``'s is clipped at 0); ``a``'s is symmetric in ``log a`` (delta method through
``log a = log a0 + b log C0``). With exactly 3 points the curve goes through them and no interval exists
(``None``, with a note). ``r2`` is the coefficient of determination of ``log L`` (the space fitted).

    fit = fit_power_law(compute, loss)              # FitError for degenerate inputs
    fit.b, fit.b_ci, fit.r2, fit.predict(1e15)
    idx = compute_frontier(compute, loss)           # the compute-optimal points (see there)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

CI_METHOD = "covariance of the log-space least-squares fit, Student-t on n-3 degrees of freedom"
MIN_POINTS = 3


class FitError(ValueError):
    """The points cannot be fitted (too few, non-finite, non-positive, no spread); the message says why."""


@dataclasses.dataclass
class PowerLawFit:
    """``L(C) = a * C^(-b) + c`` fitted to ``n`` points (see the module docstring for the method)."""
    a: float
    b: float
    c: float
    a_ci: Optional[Tuple[float, float]]
    b_ci: Optional[Tuple[float, float]]
    c_ci: Optional[Tuple[float, float]]
    r2: float
    n: int
    confidence: float
    compute_scale: float          # C0, the geometric mean of the compute values
    a_at_scale: float             # a0 = a * C0^(-b): the reducible part at C0 (well determined, unlike a)
    rmse_log: float               # root-mean-square residual of log L
    notes: List[str] = dataclasses.field(default_factory=list)
    ci_method: str = CI_METHOD

    def predict(self, compute: Any) -> np.ndarray:
        """``a * C^(-b) + c`` at ``compute`` (array-like, > 0)."""
        x = np.asarray(compute, dtype=np.float64) / self.compute_scale
        return self.a_at_scale * x ** (-self.b) + self.c

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (a value that overflowed, i.e. inf, becomes None)."""
        out = dataclasses.asdict(self)
        for key in ("a_ci", "b_ci", "c_ci"):
            out[key] = None if out[key] is None else [_finite(v) for v in out[key]]
        for key in ("a", "b", "c", "r2", "a_at_scale", "rmse_log", "compute_scale"):
            out[key] = _finite(out[key])
        out["formula"] = "L(C) = a * C^(-b) + c"
        return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def _check(compute: Sequence[float], values: Sequence[float], confidence: float,
           min_points: int) -> Tuple[np.ndarray, np.ndarray]:
    try:
        C = np.asarray(compute, dtype=np.float64).reshape(-1)
        L = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise FitError(f"compute and values must be numbers: {err}") from None
    if C.shape != L.shape:
        raise FitError(f"compute and values differ in length ({C.size} vs {L.size})")
    if not 0 < confidence < 1:
        raise FitError(f"confidence must be in (0, 1), got {confidence}")
    if not (np.isfinite(C).all() and np.isfinite(L).all()):
        raise FitError("compute and values must be finite (leave diverged points out before fitting)")
    if (C <= 0).any() or (L <= 0).any():
        raise FitError("compute and values must be > 0 (the fit is made in log space)")
    if C.size < min_points:
        raise FitError(f"{C.size} point(s): a fit of a, b, c needs at least {min_points}")
    if np.unique(C).size < MIN_POINTS:
        raise FitError(f"only {np.unique(C).size} distinct compute value(s): b and c cannot be told apart with "
                       f"fewer than {MIN_POINTS}")
    if np.ptp(np.log(L)) == 0:
        raise FitError("every value is the same: there is no trend to fit")
    return C, L


def _model(log_x: np.ndarray, log_a: float, b: float, c: float) -> np.ndarray:
    return np.log(np.exp(log_a - b * log_x) + c)


def _start(log_x: np.ndarray, y: np.ndarray) -> Tuple[float, float, float]:
    """Profile over c: for each candidate floor, log(L - c) = log a - b log x by least squares; keep the
    candidate whose full model fits log L best."""
    L_min = float(np.exp(y.min()))
    best, best_sse = None, math.inf
    A = np.stack([np.ones_like(log_x), -log_x], axis=1)
    for c in np.concatenate([[0.0], L_min * (1 - np.geomspace(1.0, 1e-3, 48))[1:]]):
        z = np.log(np.exp(y) - c)
        (log_a, b), *_ = np.linalg.lstsq(A, z, rcond=None)
        sse = float(((_model(log_x, log_a, b, c) - y) ** 2).sum())
        if math.isfinite(sse) and sse < best_sse:
            best, best_sse = (float(log_a), float(b), float(c)), sse
    return best if best is not None else (float(y.mean()), 0.1, 0.0)


def fit_power_law(compute: Sequence[float], values: Sequence[float], confidence: float = 0.95,
                  min_points: int = MIN_POINTS) -> PowerLawFit:
    """Fit ``L(C) = a C^(-b) + c`` to (compute, value) pairs, all finite and > 0 (see the module
    docstring). Raises :class:`FitError` for fewer than ``min_points`` points (3 at least), fewer than 3
    distinct compute values, non-finite or non-positive inputs, or values that do not vary."""
    from scipy import optimize, stats

    min_points = max(int(min_points), MIN_POINTS)
    C, L = _check(compute, values, confidence, min_points)
    n = C.size
    scale = float(np.exp(np.log(C).mean()))
    log_x, y = np.log(C / scale), np.log(L)
    p0 = np.array(_start(log_x, y))
    p0[2] = max(p0[2], 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptimizeWarning: covariance not estimable -> handled below
        try:
            popt, pcov = optimize.curve_fit(_model, log_x, y, p0=p0, method="trf", maxfev=20000,
                                            bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]))
        except (RuntimeError, ValueError) as err:
            raise FitError(f"the least-squares fit did not converge: {err}") from None
    log_a0, b, c = (float(v) for v in popt)
    resid = y - _model(log_x, log_a0, b, c)
    ssr, sst = float((resid ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ssr / sst
    log_scale = math.log(scale)
    notes: List[str] = []
    a_ci = b_ci = c_ci = None
    dof = n - 3
    if dof < 1:
        notes.append(f"{n} points for 3 parameters: the curve passes through them, no confidence interval")
    elif not np.isfinite(pcov).all():
        notes.append("the covariance could not be estimated (parameters not identifiable from these points): "
                     "no confidence interval")
    else:
        t = float(stats.t.ppf(0.5 + confidence / 2, dof))
        se = np.sqrt(np.clip(np.diag(pcov), 0, None))
        grad = np.array([1.0, log_scale, 0.0])  # log a = log a0 + b log C0
        se_log_a = math.sqrt(max(float(grad @ pcov @ grad), 0.0))
        log_a = log_a0 + b * log_scale
        a_ci = (_exp(log_a - t * se_log_a), _exp(log_a + t * se_log_a))
        b_ci = (b - t * se[1], b + t * se[1])
        c_ci = (max(c - t * se[2], 0.0), c + t * se[2])
    if c <= 1e-6 * float(L.min()):
        notes.append("c is at its bound 0 (no floor resolved by these points)")
    if b <= 0:
        notes.append("b <= 0: the values do not fall with compute")
    a = _exp(log_a0 + b * log_scale)
    if not math.isfinite(a) or (a_ci is not None and not all(math.isfinite(v) for v in a_ci)):
        notes.append("a (the amplitude at C = 1) or its interval overflows a float: see a_at_scale, the amplitude "
                     "at compute_scale")
    return PowerLawFit(a=a, b=b, c=c, a_ci=a_ci, b_ci=b_ci, c_ci=c_ci, r2=r2, n=n,
                       confidence=float(confidence), compute_scale=scale, a_at_scale=math.exp(log_a0),
                       rmse_log=math.sqrt(ssr / n), notes=notes)


def compute_frontier(compute: Sequence[float], values: Sequence[float]) -> List[int]:
    """Indices of the compute-optimal points, in increasing compute: a point is on the frontier when no
    point of less or equal compute has a lower (or equal, at less compute) value -- the lowest value reached
    at each compute over all model sizes. Non-finite values are never on it."""
    C = np.asarray(compute, dtype=np.float64).reshape(-1)
    L = np.asarray(values, dtype=np.float64).reshape(-1)
    if C.shape != L.shape:
        raise FitError(f"compute and values differ in length ({C.size} vs {L.size})")
    order = sorted((i for i in range(C.size) if np.isfinite(C[i]) and np.isfinite(L[i])),
                   key=lambda i: (C[i], L[i]))
    out: List[int] = []
    best = math.inf
    i = 0
    while i < len(order):
        j = i  # points of the same compute: only the lowest (first after sorting) can be on it
        while j < len(order) and C[order[j]] == C[order[i]]:
            j += 1
        k = order[i]
        if L[k] < best:
            out.append(k)
            best = L[k]
        i = j
    return out


def _fit_entry(keys: List[str], compute: List[float], values: List[float], confidence: float) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"points": keys, "compute": compute, "values": values}
    try:
        entry["fit"] = fit_power_law(compute, values, confidence).to_dict()
    except FitError as err:
        entry["fit"], entry["error"] = None, str(err)
    return entry


def fit_grid(points: Sequence[Dict[str, Any]], confidence: float = 0.95) -> Dict[str, Any]:
    """The fits of a study's point records (dicts with ``key``, ``size_key``, ``status``, ``train_flops``,
    ``held_out_loss`` and optionally ``fd``):

    - ``loss_frontier``: loss against compute on the compute-optimal frontier (:func:`compute_frontier` over
      all sizes);
    - ``loss_per_size``: one fit per model size over its budgets;
    - ``fd_frontier``: FD against compute on FD's own frontier (when points have an FD);
    - ``excluded``: points left out (status other than ``ok``, e.g. diverged), each with its reason.

    Each fit entry names its points; a fit that cannot be made has ``fit: None`` and ``error`` saying why."""
    usable, excluded = [], []
    for p in points:
        loss = p.get("held_out_loss")
        if p.get("status") == "ok" and loss is not None and math.isfinite(loss):
            usable.append(p)
        else:
            excluded.append({"key": p.get("key"), "status": p.get("status"),
                             "reason": p.get("reason") or "no finite held-out loss"})

    def frontier_entry(metric: str) -> Dict[str, Any]:
        have = [p for p in usable if p.get(metric) is not None and math.isfinite(p[metric])]
        idx = compute_frontier([p["train_flops"] for p in have], [p[metric] for p in have])
        chosen = [have[i] for i in idx]
        return _fit_entry([p["key"] for p in chosen], [p["train_flops"] for p in chosen],
                          [p[metric] for p in chosen], confidence)

    per_size: Dict[str, Any] = {}
    for size in dict.fromkeys(p.get("size_key") for p in points):
        mine = sorted((p for p in usable if p.get("size_key") == size), key=lambda p: p["train_flops"])
        per_size[size] = _fit_entry([p["key"] for p in mine], [p["train_flops"] for p in mine],
                                    [p["held_out_loss"] for p in mine], confidence)
        left_out = [e["key"] for e in excluded if any(p.get("key") == e["key"] and p.get("size_key") == size
                                                      for p in points)]
        if left_out:
            per_size[size]["excluded"] = left_out
            if per_size[size].get("error"):
                per_size[size]["error"] += f"; left out: {', '.join(left_out)}"
    out = {"loss_frontier": frontier_entry("held_out_loss"), "loss_per_size": per_size, "excluded": excluded}
    if any(p.get("fd") is not None for p in usable):
        out["fd_frontier"] = frontier_entry("fd")
    return out

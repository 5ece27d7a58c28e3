"""``scaling.png`` of a study report: held-out loss against training FLOPs per model size, with the
compute-optimal frontier and its power-law fit (left), and FD against FLOPs (right, when measured).
Matplotlib with the Agg backend (no display needed)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np


def _fit_label(name: str, fit: Dict[str, Any]) -> str:
    ci = fit.get("b_ci")
    b = f"b={fit['b']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return f"{name}: a·C^-b + c, {b}, c={fit['c']:.3g}, R²={fit['r2']:.3f}"


def _draw(ax, report: Dict[str, Any], metric: str, frontier_key: str, ylabel: str) -> int:
    """Per-size curves of ``metric`` against training FLOPs, the frontier and its fit; returns how many
    points had a value."""
    import matplotlib

    points: List[Dict[str, Any]] = report["points"]
    sizes = report["grid"]["sizes"]
    cmap = matplotlib.colormaps["viridis"]
    drawn = 0
    for i, size in enumerate(sizes):
        mine = sorted((p for p in points if p.get("size_key") == size["key"] and p.get("status") == "ok"
                       and p.get(metric) is not None), key=lambda p: p["train_flops"])
        if not mine:
            continue
        drawn += len(mine)
        color = cmap(i / max(1, len(sizes) - 1))
        ax.plot([p["train_flops"] for p in mine], [p[metric] for p in mine], "o-", color=color, ms=4, lw=1.2,
                label=f"{size['label']} ({size['params'] / 1e6:.3g} M params)")
    entry = report["fits"].get(frontier_key)
    if entry and entry.get("points"):
        ax.plot(entry["compute"], entry["values"], "o", mfc="none", mec="black", ms=9, mew=1.2,
                label="compute-optimal frontier")
        fit = entry.get("fit")
        if fit and all(fit.get(k) is not None for k in ("a_at_scale", "compute_scale", "b", "c", "r2")):
            lo, hi = min(entry["compute"]), max(entry["compute"])
            xs = np.geomspace(lo / 1.5, hi * 1.5, 200)
            ys = fit["a_at_scale"] * (xs / fit["compute_scale"]) ** (-fit["b"]) + fit["c"]
            ax.plot(xs, ys, "k--", lw=1.2, label=_fit_label("frontier fit", fit))
    diverged = [p for p in points if p.get("status") != "ok"]
    if diverged:
        ax.plot([], [], " ", label=f"{len(diverged)} point(s) not shown: " +
                ", ".join(sorted({p.get('status', '?') for p in diverged})))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return drawn


def plot_study(report: Dict[str, Any], path: str) -> Optional[str]:
    """Write the figure of ``report`` (what :meth:`fastdit.scaling.study.Study.write_report` assembles) to
    ``path`` (PNG, written to a temporary name and renamed); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    has_fd = any(p.get("fd") is not None for p in report["points"])
    fig, axes = plt.subplots(1, 2 if has_fd else 1, figsize=(13 if has_fd else 7, 5), squeeze=False)
    _draw(axes[0, 0], report, "held_out_loss", "loss_frontier", "held-out loss (EMA weights)")
    axes[0, 0].set_title("loss vs training compute")
    if has_fd:
        ref = (report["grid"].get("evaluation") or {}).get("fd_real_reference") or {}
        if ref.get("fd"):
            axes[0, 1].axhline(ref["fd"], color="grey", ls=":", lw=1.2,
                               label=f"real training digits: FD {ref['fd']:.3g} (yardstick)")
        _draw(axes[0, 1], report, "fd", "fd_frontier", "FD vs held-out digits (feature space)")
        axes[0, 1].set_title("sample quality vs training compute")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path

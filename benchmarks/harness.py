"""GPU benchmark harness: timing, rooflines, and the JSON/markdown record of a run.

The figure of record is ``triton.testing.do_bench``: CUDA events around each call, L2 flushed between
calls, median over ~``rep_ms`` of repeats (with the 20th/80th percentiles as the spread). Each result
carries the bytes or FLOPs it must move or do, so it is reported as GB/s or TFLOP/s and as a fraction
of the ceilings (device copy bandwidth, bf16 matmul rate) measured in the same process.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Result:
    group: str                  # e.g. "adaln.fwd" — rows of one table
    impl: str                   # e.g. "fastdit-triton", "eager-reference", "compile-reference"
    shape: str                  # e.g. "64x256x1152"
    ms: float                   # median, as called from Python (host overhead included where it shows)
    ms_p20: float
    ms_p80: float
    ms_graph: Optional[float] = None   # median of CUDA-graph replays: GPU time without host overhead
    bytes: Optional[float] = None
    flops: Optional[float] = None
    GBps: Optional[float] = None
    TFLOPs: Optional[float] = None
    fraction_of_ceiling: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100):
    """(median, p20, p80) milliseconds of ``fn`` on the GPU, via triton's do_bench."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80)


from fastdit.bench.timing import time_cuda_graph  # noqa: E402,F401  (one copy: the bench package's)


_COTANGENTS: Dict[tuple, torch.Tensor] = {}


def grad_with_fixed_cotangents(outs, inputs, retain_graph: bool = False):
    """Gradients of ``outs`` w.r.t. ``inputs`` with fixed random cotangents: one tensor per output (two
    outputs sharing one would let a kernel read it from cache the second time), made on first use
    (in the warm-up), never inside a timed call."""
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    cotangents = []
    for index, out in enumerate(outs):
        key = (index, tuple(out.shape), out.dtype, out.device)
        if key not in _COTANGENTS:
            generator = torch.Generator(device=out.device)
            generator.manual_seed(1 + index)
            _COTANGENTS[key] = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
        cotangents.append(_COTANGENTS[key])
    return torch.autograd.grad(outs, inputs, cotangents, retain_graph=retain_graph)


def direction_builder(direction: str, forward: Callable, inputs, extra_args=()) -> Callable[[], Callable[[], object]]:
    """``build`` for the ``gpu_bench`` fixture: ``"fwd"`` (under no_grad), ``"fwd+bwd"``, or ``"bwd"`` alone
    (the forward runs once, inside ``build``, on the stream that will replay the backward)."""
    def build():
        if direction == "fwd":
            def run():
                with torch.no_grad():
                    return forward(*inputs, *extra_args)
            return run
        if direction == "fwd+bwd":
            return lambda: grad_with_fixed_cotangents(forward(*inputs, *extra_args), inputs)
        if direction != "bwd":
            raise ValueError(f"direction must be fwd, bwd or fwd+bwd, got {direction!r}")
        outs = forward(*inputs, *extra_args)
        return lambda: grad_with_fixed_cotangents(outs, inputs, retain_graph=True)
    return build


def environment() -> Dict[str, object]:
    import triton

    import fastdit

    commit = os.environ.get("FASTDIT_GIT_COMMIT")  # set by the caller where the tree travels without .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "fastdit": fastdit.__version__,
        "git_commit": commit,
        "date": datetime.date.today().isoformat(),
        "timer": "triton.testing.do_bench median (CUDA events, L2 flushed between calls)",
    }


def measure_copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written, in GB/s."""
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms, _, _ = time_cuda(lambda: y.copy_(x), rep_ms=200)
    return 2 * 2**30 / ms / 1e6


def measure_matmul_rate(n: int = 8192) -> float:
    """bf16 n×n×n matmul on random data, TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _, _ = time_cuda(lambda: a @ b, rep_ms=300)
    return 2 * n**3 / ms / 1e9


class Recorder:
    """Collects the results of a session and writes them as JSON and a markdown table."""

    def __init__(self):
        self.results: List[Result] = []
        self.ceilings: Dict[str, float] = {}

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def to_json(self) -> Dict[str, object]:
        return {**environment(), "ceilings": self.ceilings, "results": [asdict(r) for r in self.results]}

    def markdown(self) -> str:
        env = environment()
        lines = [f"GPU: {env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
                 f"{env['date']} · ceilings: " + ", ".join(f"{k} {v:,.0f}" for k, v in self.ceilings.items()), ""]
        groups: Dict[str, List[Result]] = {}
        for r in self.results:
            groups.setdefault(r.group, []).append(r)
        for group, rows in groups.items():
            unit = "GB/s" if rows[0].GBps is not None else "TFLOP/s"
            lines += [f"### {group}", "", f"| shape | impl | ms (p20–p80) | {unit} | of ceiling | "
                      f"graph-replay ms | graph {unit} |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                rate = r.GBps if r.GBps is not None else r.TFLOPs
                frac = "" if r.fraction_of_ceiling is None else f"{100 * r.fraction_of_ceiling:.0f}%"
                work = r.bytes if r.bytes is not None else r.flops
                scale = 1e6 if r.bytes is not None else 1e9
                graph = "" if r.ms_graph is None else f"{r.ms_graph:.4f}"
                graph_rate = "" if (r.ms_graph is None or work is None) else f"{work / r.ms_graph / scale:,.1f}"
                lines.append(f"| {r.shape} | {r.impl} | {r.ms:.4f} ({r.ms_p20:.4f}–{r.ms_p80:.4f}) | "
                             f"{'' if rate is None else f'{rate:,.1f}'} | {frac} | {graph} | {graph_rate} |")
            lines.append("")
        return "\n".join(lines)

    def write(self, json_path: Optional[str], markdown_path: Optional[str]) -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(self.to_json(), indent=1) + "\n")
        if markdown_path:
            Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
            Path(markdown_path).write_text(self.markdown() + "\n")

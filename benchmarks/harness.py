"""GPU benchmark harness of the pytest suite (``benchmarks/test_*.py``): the :class:`Result` of one timed
callable, the :class:`Recorder` that writes a session's results as JSON and a markdown table, and
:func:`direction_builder` (fwd / bwd / fwd+bwd with fixed random cotangents).

Everything else has one implementation, in ``fastdit.bench`` (shared with ``fastdit bench``), which the
benchmark scripts import directly: ``fastdit.bench.timing.time_callable`` (the figure of record,
``triton.testing.do_bench``: CUDA events around each call, L2 flushed between calls, median over ~100 ms of
repeats with the 20th/80th percentiles as the spread), ``time_cuda_graph`` (CUDA-graph replay),
``measure_copy_bandwidth`` / ``measure_matmul_rate`` (the ceilings, measured in the same process) and
``environment`` (the record of what ran); ``fastdit.bench.stock.direction_call`` is what
:func:`direction_builder` builds. Each result carries the bytes or FLOPs it must move or do, so it is
reported as GB/s or TFLOP/s and as a fraction of those ceilings.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastdit.bench.stock import DIRECTIONS, direction_call
from fastdit.bench.timing import environment


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


_COTANGENTS: Dict[tuple, torch.Tensor] = {}


def fixed_cotangents(outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Fixed random cotangents for ``outs``: one tensor per output (two outputs sharing one would let a
    kernel read it from cache the second time), made on first use for each (position, shape, dtype,
    device) from a generator seeded with 1 + position, and the same tensors ever after (in the timed
    call and in the CUDA-graph capture alike)."""
    cotangents = []
    for index, out in enumerate(outs):
        key = (index, tuple(out.shape), out.dtype, out.device)
        if key not in _COTANGENTS:
            generator = torch.Generator(device=out.device)
            generator.manual_seed(1 + index)
            _COTANGENTS[key] = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
        cotangents.append(_COTANGENTS[key])
    return cotangents


def direction_builder(direction: str, forward: Callable, inputs: Sequence[torch.Tensor],
                      extra_args: Sequence[Any] = ()) -> Callable[[], Callable[[], object]]:
    """``build`` for the ``gpu_bench`` fixture: ``"fwd"`` (under no_grad), ``"fwd+bwd"`` (gradients w.r.t.
    ``inputs``, not ``extra_args``, with :func:`fixed_cotangents`), or ``"bwd"`` alone (the forward runs
    once, inside ``build``, on the stream that will replay the backward). The callable is
    ``fastdit.bench.stock.direction_call``'s."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be fwd, bwd or fwd+bwd, got {direction!r}")
    inputs, extra_args = list(inputs), tuple(extra_args)

    def build():
        return direction_call(direction, forward, inputs, fixed_cotangents, extra_args)
    return build


class Recorder:
    """Collects the results of a session and writes them as JSON and a markdown table."""

    def __init__(self):
        self.results: List[Result] = []
        self.ceilings: Dict[str, float] = {}
        self._environment: Optional[Dict[str, Any]] = None

    def environment(self) -> Dict[str, Any]:
        """``fastdit.bench.timing.environment()``, taken once per session."""
        if self._environment is None:
            self._environment = environment()
        return self._environment

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def to_json(self) -> Dict[str, object]:
        return {**self.environment(), "ceilings": self.ceilings, "results": [asdict(r) for r in self.results]}

    def markdown(self) -> str:
        env = self.environment()
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

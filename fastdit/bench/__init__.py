"""fastdit.bench: the code behind ``fastdit bench`` -- every fastdit piece timed against every stock
alternative on the user's machine, in one process, each result checked against a reference.

- :mod:`fastdit.bench.registry`: :class:`Context`, :class:`Peer`, :class:`Workload`, :class:`Case`,
  :func:`register`, :func:`all_cases`, :func:`select` -- what a benchmark case is; the ``cases_*``
  modules register the cases of each group (:data:`GROUPS`).
- :mod:`fastdit.bench.timing`: ``do_bench`` timing (CUDA events, L2 flushed), CUDA-graph replay, peak
  memory, the ceilings (copy bandwidth, bf16 / fp8 matmul) and the environment record.
- :mod:`fastdit.bench.runner`: :func:`run` -> :class:`BenchRun` (failures recorded per peer, derived
  rates and speed-ups).
- :mod:`fastdit.bench.report`: :func:`write_report` (bench.json, summary.md, PNG plots) and
  :func:`readme_tables` (the README's headline block).

On the CPU everything runs with tiny shapes so that the code is tested; the timings there mean nothing.
"""
from fastdit.bench.registry import GROUPS, Case, Context, Peer, Workload, all_cases, register, select
from fastdit.bench.report import readme_tables, write_report
from fastdit.bench.runner import BenchRun, run
from fastdit.bench.timing import Timing, ceilings, environment, gpu_slug, peak_memory, time_callable

__all__ = ["GROUPS", "Case", "Context", "Peer", "Workload", "all_cases", "register", "select", "run", "BenchRun",
           "write_report", "readme_tables", "Timing", "time_callable", "peak_memory", "ceilings", "environment",
           "gpu_slug"]

"""pytest-benchmark GPU suite. Skips cleanly without CUDA; not part of the default test run.

    pytest benchmarks --fastdit-json benchmarks/results/<date>_<gpu>_<what>/bench.json --fastdit-md benchmarks/results/<date>_<gpu>_<what>/bench.md

The ``gpu_bench`` fixture times a callable with ``fastdit.bench.timing.time_callable`` (do_bench: the
recorded figure) and ``time_cuda_graph``, and hands the same callable to pytest-benchmark with a
CUDA-synchronising clock (its own table is a cross-check). The ceilings are ``fastdit.bench.timing``'s.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import pytest
import torch

from fastdit.bench.registry import Context
from fastdit.bench.timing import measure_copy_bandwidth, measure_matmul_rate, time_callable, time_cuda_graph

sys.path.insert(0, os.path.dirname(__file__))  # for `harness` (benchmarks/ is not a package)
from harness import Recorder, Result  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastdit")
    group.addoption("--fastdit-json", default=None, help="write the session's results as JSON here")
    group.addoption("--fastdit-md", default=None, help="write the session's results as a markdown table here")


def pytest_configure(config):
    # pytest-benchmark (the `bench` extra) registers this marker; without it, --strict-markers (pyproject)
    # would fail the collection below on a machine that only collects or skips these tests
    config.addinivalue_line("markers", "benchmark(**kwargs): pytest-benchmark's options for one test")


def cuda_synchronized_clock() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="the benchmark suite needs a CUDA GPU"))
        # pytest-benchmark's own rounds are timed with a clock that waits for the GPU first
        item.add_marker(pytest.mark.benchmark(timer=cuda_synchronized_clock))


_RECORDER = Recorder()


def pytest_sessionfinish(session, exitstatus):
    if _RECORDER.results:
        _RECORDER.write(session.config.getoption("--fastdit-json"), session.config.getoption("--fastdit-md"))
        print("\n" + _RECORDER.markdown())


@pytest.fixture
def randn():
    """``randn(*shape, dtype=..., requires_grad=False)`` on the GPU from a private, seeded generator: random
    data for benchmarks never touches the default generator (which a refused graph capture can leave
    unusable)."""
    generator = torch.Generator(device="cuda")
    generator.manual_seed(0)

    def make(*shape, dtype=torch.bfloat16, requires_grad=False):
        t = torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)
        return t.requires_grad_(requires_grad)

    return make


@pytest.fixture(scope="session")
def bench_context() -> Context:
    """fastdit.bench's context on the current CUDA device, full (not quick) timing."""
    return Context.create("cuda", quick=False)


@pytest.fixture(scope="session")
def ceilings(bench_context):
    if not _RECORDER.ceilings:
        _RECORDER.ceilings["copy_GBps"] = measure_copy_bandwidth(bench_context, quick=False)
        _RECORDER.ceilings["bf16_matmul_TFLOPs"] = measure_matmul_rate(bench_context, quick=False)
    return _RECORDER.ceilings


@pytest.fixture
def gpu_bench(benchmark, ceilings, bench_context):
    """``gpu_bench(build, group=, impl=, shape=, bytes=None, flops=None, graph=True, **extra) -> Result``.

    ``build()`` makes the callable to time (called again on the capture stream for ``ms_graph``, the
    CUDA-graph replay figure, when ``graph=True``)."""

    def run(build: Callable[[], Callable[[], object]], *, group: str, impl: str, shape: str,
            bytes: Optional[float] = None, flops: Optional[float] = None, graph: bool = True, **extra) -> Result:
        fn = build()
        timing = time_callable(fn, bench_context, quick=False)  # do_bench: median, p20, p80; L2 flushed
        ms, p20, p80 = timing.ms, timing.p20, timing.p80
        ms_graph, graph_error = time_cuda_graph(build) if graph else (None, None)
        if graph_error:
            extra["graph_error"] = graph_error
        result = Result(group=group, impl=impl, shape=shape, ms=ms, ms_p20=p20, ms_p80=p80, bytes=bytes,
                        flops=flops, extra=extra, ms_graph=ms_graph)
        if bytes is not None:
            result.GBps = bytes / ms / 1e6
            result.fraction_of_ceiling = result.GBps / ceilings["copy_GBps"]
        if flops is not None:
            result.TFLOPs = flops / ms / 1e9
            result.fraction_of_ceiling = result.TFLOPs / ceilings["bf16_matmul_TFLOPs"]
        benchmark.group = group
        benchmark.extra_info.update({"impl": impl, "shape": shape, "do_bench_ms": ms, "GBps": result.GBps,
                                     "TFLOPs": result.TFLOPs})
        iterations = max(1, int(2.0 / max(ms, 1e-3)))  # ~2 ms of GPU work per round
        benchmark.pedantic(fn, rounds=10, iterations=iterations, warmup_rounds=1)
        return _RECORDER.add(result)

    return run

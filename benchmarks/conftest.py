"""pytest-benchmark GPU suite. Skips cleanly without CUDA; not part of the default test run.

    pytest benchmarks --fastdit-json benchmarks/results/<date>_<gpu>_<what>/bench.json --fastdit-md benchmarks/results/<date>_<gpu>_<what>/bench.md

The ``gpu_bench`` fixture times a callable with do_bench (the recorded figure) and hands the same
callable to pytest-benchmark with a CUDA-synchronising clock (its own table is a cross-check).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `harness` (benchmarks/ is not a package)
from harness import (Recorder, Result, measure_copy_bandwidth, measure_matmul_rate, time_cuda,  # noqa: E402
                     time_cuda_graph)


def pytest_addoption(parser):
    group = parser.getgroup("fastdit")
    group.addoption("--fastdit-json", default=None, help="write the session's results as JSON here")
    group.addoption("--fastdit-md", default=None, help="write the session's results as a markdown table here")


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
def ceilings():
    if not _RECORDER.ceilings:
        _RECORDER.ceilings["copy_GBps"] = measure_copy_bandwidth()
        _RECORDER.ceilings["bf16_matmul_TFLOPs"] = measure_matmul_rate()
    return _RECORDER.ceilings


@pytest.fixture
def gpu_bench(benchmark, ceilings):
    """``gpu_bench(build, group=, impl=, shape=, bytes=None, flops=None, graph=True, **extra) -> Result``.

    ``build()`` makes the callable to time (called again on the capture stream for ``ms_graph``, the
    CUDA-graph replay figure, when ``graph=True``)."""

    def run(build: Callable[[], Callable[[], object]], *, group: str, impl: str, shape: str,
            bytes: Optional[float] = None, flops: Optional[float] = None, graph: bool = True, **extra) -> Result:
        fn = build()
        ms, p20, p80 = time_cuda(fn)
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

"""pytest-benchmark over the `fastdit bench` registry: one test per (case, shape, peer) of ``all_cases()``.

    pytest benchmarks/test_bench_cases.py                       # quick shapes
    FASTDIT_BENCH_FULL=1 pytest benchmarks/test_bench_cases.py  # full shapes
    pytest benchmarks/test_bench_cases.py -k "attention and fastdit" --fastdit-json out.json

Each test builds the workload on CUDA (once per (case, shape): consecutive peers share it), checks the
peer's result against the workload's reference (a wrong result fails the test), then times it with the
``gpu_bench`` fixture of benchmarks/conftest.py (do_bench figure recorded for --fastdit-json/--fastdit-md,
pytest-benchmark's own rounds as a cross-check). A peer that cannot run here (``Peer.skip``) or that the
workload does not build at this shape is skipped with the reason. Without CUDA every test is skipped
(benchmarks/conftest.py). `fastdit bench` runs the same cases in one process with a report.
"""
import gc
import os
import sys

import pytest
import torch

from fastdit.bench.registry import Context, all_cases

FULL = os.environ.get("FASTDIT_BENCH_FULL", "") == "1"


def _params():
    params = []
    for case in all_cases():
        for shape in (case.shapes if FULL else case.quick_shapes):
            for peer in case.peers or ("fastdit",):
                params.append(pytest.param(case, shape, peer, id=f"{case.name}-{shape}-{peer}"))
    return params


_CURRENT = {}  # the workload of the (case, shape) being benchmarked, with its reference


def _workload(case, shape):
    """The workload and reference of (case, shape), made once for its consecutive peer tests."""
    key = (case.name, shape)
    if _CURRENT.get("key") != key:
        _CURRENT.clear()
        gc.collect()
        torch.cuda.empty_cache()
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()  # each workload's compiled peers start from a clean recompile budget
        ctx = Context.create("cuda", quick=not FULL)
        workload = case.make(ctx, shape, case.shapes_for(ctx)[shape])
        reference = workload.reference() if workload.reference is not None else None
        _CURRENT.update(key=key, workload=workload, reference=reference)
    return _CURRENT["workload"], _CURRENT["reference"]


@pytest.mark.parametrize("case,shape,peer_name", _params())
def test_bench_case(gpu_bench, case, shape, peer_name):
    workload, reference = _workload(case, shape)
    peer = next((p for p in workload.peers if p.name == peer_name), None)
    if peer is None:
        pytest.skip(f"{case.name} builds no {peer_name} peer at shape {shape}")
    if peer.skip:
        pytest.skip(f"{peer_name}: {peer.skip}")
    fn = peer.build()
    result = fn()
    if workload.check is not None and reference is not None and result is not None:
        ok, detail = workload.check(result, reference)
        assert ok, f"{peer_name} on {case.name}[{shape}] gave a wrong result: {detail}"
    del result
    gpu_bench(lambda: fn, group=workload.name, impl=peer_name, shape=shape, bytes=workload.bytes,
              flops=workload.flops, graph=False, dims=workload.dims, items=workload.items,
              item_unit=workload.item_unit)

"""The ``fastdit bench`` cases on the CPU: every case's quick workloads build, every peer that can run here runs
once and passes its check against the reference, every peer that cannot says why, and every check fails on a
wrong result. Compiled peers (seconds of inductor C++ compilation each) run in the ``slow`` test."""
import math

import pytest
import torch

from fastdit.bench.registry import GROUPS, Context, all_cases

MY_GROUPS = GROUPS
CASES = [case for case in all_cases() if case.group in MY_GROUPS]
JOBS = [(case, shape, params) for case in CASES for shape, params in case.quick_shapes.items()]
IDS = [f"{case.name}[{shape}]" for case, shape, _ in JOBS]


def cpu_context():
    return Context(device=torch.device("cpu"), quick=True, dtype=torch.float32, memory_bytes=2 * 2**30, seed=0)


def is_compiled(peer_name):
    return "compile" in peer_name


def perturbed(result):
    """The result with every floating-point tensor made wrong (scaled and shifted)."""
    if isinstance(result, torch.Tensor):
        if result.is_floating_point():
            return result * 1.5 + 0.5 * result.abs().max().clamp_min(1.0)
        return result
    if isinstance(result, dict):
        return {k: perturbed(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return type(result)(perturbed(v) for v in result)
    if isinstance(result, float):
        return result * 2 + 1
    return result


def run_peers(workload, select):
    if all(peer.skip for peer in workload.peers):  # e.g. diffusers not installed
        pytest.skip("; ".join(sorted({peer.skip for peer in workload.peers})))
    assert workload.check is not None and workload.reference is not None
    reference = workload.reference()
    ran = []
    for peer in workload.peers:
        if peer.skip or not select(peer.name):
            continue
        fn = peer.build()
        result = fn()
        ok, detail = workload.check(result, reference)
        assert ok, f"{workload.name}[{workload.shape}] {peer.name}: {detail}"
        bad_ok, bad_detail = workload.check(perturbed(result), reference)
        assert not bad_ok, f"{workload.name}[{workload.shape}] {peer.name}: a wrong result passed ({bad_detail})"
        if not ran:
            fn()  # timed callables are repeatable
        ran.append(peer.name)
    return ran


@pytest.mark.parametrize("case,shape,params", JOBS, ids=IDS)
def test_quick_workload_runs_and_checks(case, shape, params):
    workload = case.make(cpu_context(), shape, params)
    assert workload.group == case.group and workload.shape == shape and workload.dims
    assert workload.peers and workload.peers[0].name == "fastdit"
    names = [p.name for p in workload.peers]
    assert len(names) == len(set(names)), names
    for peer in workload.peers:
        assert peer.build is not None or peer.skip, peer.name
        if peer.build is None:
            assert len(peer.skip) > 10, f"{peer.name}: skip reason {peer.skip!r}"
    for value in (workload.bytes, workload.flops, workload.items):
        assert value is None or (math.isfinite(value) and value > 0)
    assert workload.bytes or workload.flops or workload.items
    ran = run_peers(workload, lambda name: not is_compiled(name))
    assert ran, "no peer ran on the CPU"


@pytest.mark.slow
@pytest.mark.parametrize("case,shape,params", JOBS, ids=IDS)
def test_quick_workload_compiled_peers(case, shape, params):
    workload = case.make(cpu_context(), shape, params)
    run_peers(workload, is_compiled)


def test_full_shapes_are_refused_on_the_cpu():
    ctx = cpu_context()
    for case in CASES:
        for shape, params in case.shapes.items():
            with pytest.raises(ValueError):
                case.make(ctx, shape, params)


def test_shape_names():
    for case in CASES:
        assert set(case.quick_shapes) <= set(case.shapes), case.name
        assert case.shapes and case.quick_shapes, case.name
    sweeps = [case for case in CASES if any(s.startswith("seq") for s in case.shapes)]
    assert sweeps, "the attention sweep (shapes seq1024 ... seq16384) is registered"
    for case in sweeps:
        assert {f"seq{n}" for n in (1024, 2048, 4096, 8192, 16384)} <= set(case.shapes)

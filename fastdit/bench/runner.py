"""Run bench cases: every peer of every workload, timed and checked in one process.

For each case and shape the runner builds the workload (an error is recorded and the run goes on),
computes the reference once, then for each peer: skip it (with the reason), or build it, call it once
untimed and check that result against the reference, warm it up, time it, and measure its peak memory.
Any exception of a peer is recorded as ``{"status": "failed", "stage": ..., "reason": "OutOfMemoryError:
..."}``; after an out-of-memory error the CUDA cache is emptied. Derived figures per peer: GB/s and the
fraction of the copy ceiling (from ``bytes``), TFLOP/s and the fraction of the matmul ceiling (from
``flops``), items/s (from ``items``); per workload, fastdit's speed-up over each other peer (the ratio of
their median ms) and over the fastest stock peer (the fastest non-fastdit peer whose result passed its
check, or had none to check).
"""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastdit.bench.registry import Case, Context, Peer, Workload
from fastdit.bench.timing import ceilings as measure_ceilings
from fastdit.bench.timing import environment, peak_memory, time_callable, time_cuda_graph

FASTDIT = "fastdit"
REASON_CHARS = 600  # an exception's message is cut to this length in the record


@dataclass
class BenchRun:
    """Everything one run produced, as plain JSON-able values: the environment, the ceilings measured in
    the run, the context (device, dtype, quick), the settings it ran with, and one row per workload."""
    environment: Dict[str, Any]
    ceilings: Dict[str, Any]
    context: Dict[str, Any]
    settings: Dict[str, Any]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def is_fastdit(peer_name: str) -> bool:
    """fastdit's own peers are named "fastdit" or "fastdit-..." (every other peer is a stock one)."""
    return peer_name == FASTDIT or peer_name.startswith(FASTDIT + "-")


def describe_error(err: BaseException) -> str:
    """``"TypeName: message"`` on one line, cut to :data:`REASON_CHARS`."""
    message = " ".join(str(err).split())
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory(ctx: Context) -> None:
    """Collect garbage and hand cached blocks back to the device (after an OOM, after each workload)."""
    gc.collect()
    if ctx.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def _finite(value: Optional[float]) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


def _check(workload: Workload, result: Any, reference: Any, reference_status: str) -> Dict[str, Any]:
    """``{"check": "passed" | "failed" | "not checked", "check_detail": ...}`` for one peer's result."""
    if workload.check is None:
        return {"check": "not checked", "check_detail": "the workload has no check"}
    if reference_status != "ok":
        return {"check": "not checked", "check_detail": f"no reference result ({reference_status})"}
    if result is None:
        return {"check": "not checked", "check_detail": "the peer returned no result"}
    try:
        ok, detail = workload.check(result, reference)
    except Exception as err:  # a check that cannot compare counts as a failed check, with the reason
        return {"check": "failed", "check_detail": f"the check raised {describe_error(err)}"}
    return {"check": "passed" if bool(ok) else "failed", "check_detail": str(detail)}


def _rates(record: Dict[str, Any], workload: Workload, ceilings: Dict[str, Any]) -> None:
    """GB/s, TFLOP/s, items/s and fractions of the ceilings, from the peer's median ms."""
    ms = record.get("ms")
    if not ms or ms <= 0:
        return
    copy, matmul = ceilings.get("copy_GBps"), ceilings.get("bf16_matmul_TFLOPs")
    fp8 = ceilings.get("fp8_matmul_TFLOPs")
    if workload.bytes:
        record["GBps"] = _finite(workload.bytes / ms / 1e6)
        record["fraction_of_copy"] = _finite(record["GBps"] / copy) if copy and record["GBps"] else None
    if workload.flops:
        record["TFLOPs"] = _finite(workload.flops / ms / 1e9)
        record["fraction_of_matmul"] = _finite(record["TFLOPs"] / matmul) if matmul and record["TFLOPs"] else None
        if fp8 and record["TFLOPs"] and any(tag in record["name"] for tag in ("fp8", "float8")):
            record["fraction_of_fp8_matmul"] = _finite(record["TFLOPs"] / fp8)
    if workload.items:
        record["items_per_s"] = _finite(workload.items / (ms / 1e3))


def _speedups(row: Dict[str, Any]) -> None:
    """fastdit's speed-up over each other timed peer, and over the fastest stock peer."""
    timed = [p for p in row["peers"] if p["status"] == "ok" and p.get("ms")]
    ours = next((p for p in timed if p["name"] == FASTDIT), None) or next(
        (p for p in timed if is_fastdit(p["name"])), None)
    row["fastdit_peer"] = ours["name"] if ours else None
    row["fastdit_speedup"] = {}
    row["fastest_stock"] = None
    if ours is None:
        return
    for peer in timed:
        if peer is not ours:
            peer["fastdit_speedup"] = _finite(peer["ms"] / ours["ms"])
            row["fastdit_speedup"][peer["name"]] = peer["fastdit_speedup"]
    stock = [p for p in timed if not is_fastdit(p["name"]) and p.get("check") != "failed"]
    if stock:
        best = min(stock, key=lambda p: p["ms"])
        row["fastest_stock"] = {"peer": best["name"], "ms": best["ms"],
                                "speedup": _finite(best["ms"] / ours["ms"])}


class _Progress:
    """A tqdm bar over (workload, peer) pairs, whose total grows as workloads reveal their peers."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="peer", desc="fastdit bench", file=sys.stderr, dynamic_ncols=True)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60])

    def grow(self, extra: int) -> None:
        if self.bar is not None and extra:
            self.bar.total += extra
            self.bar.refresh()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_peer(peer, workload: Workload, ctx: Context, reference: Any, reference_status: str,
              ceilings: Dict[str, Any], graph: bool) -> Dict[str, Any]:
    record: Dict[str, Any] = {"name": peer.name, "status": "ok"}
    if peer.skip or peer.build is None:
        record.update(status="skipped", reason=peer.skip or "no build function")
        return record
    stage, fn = "build", None
    try:
        start = time.perf_counter()
        fn = peer.build()
        record["build_seconds"] = time.perf_counter() - start
        stage = "call"
        start = time.perf_counter()
        result = fn()
        _synchronize(ctx)
        record["first_call_seconds"] = time.perf_counter() - start  # compilation and autotuning show here
        stage = "check"
        record.update(_check(workload, result, reference, reference_status))
        del result
        if ctx.device.type == "cuda":  # (on the CPU, where timings mean nothing, the first call is enough)
            stage = "warm-up"
            fn()
            _synchronize(ctx)
        stage = "time"
        timing = time_callable(fn, ctx, quick=ctx.quick, warm_up=False)
        record.update(ms=timing.ms, p20=timing.p20, p80=timing.p80, repeats=timing.repeats)
        stage = "memory"
        record["peak_memory_bytes"] = peak_memory(fn, ctx)
        if graph and ctx.device.type == "cuda":
            stage = "graph"
            fn = None
            release_memory(ctx)
            record["ms_graph"], graph_error = time_cuda_graph(peer.build)
            if graph_error:
                record["graph_error"] = graph_error
    except Exception as err:  # every failure of one peer is recorded; the run goes on
        record.update(status="failed", stage=stage, reason=describe_error(err))
        for key in ("ms", "p20", "p80", "repeats", "peak_memory_bytes", "ms_graph"):
            record.pop(key, None)
        fn = None
        if is_out_of_memory(err):
            record["out_of_memory"] = True
            release_memory(ctx)
        return record
    finally:
        fn = None
    _rates(record, workload, ceilings)
    return record


def _workload_row(case: Case, shape: str) -> Dict[str, Any]:
    return {"group": case.group, "name": case.name, "shape": shape, "dims": None, "bytes": None, "flops": None,
            "items": None, "item_unit": "", "status": "ok", "peers": []}


def run_workload(workload: Workload, ctx: Context, row: Dict[str, Any], ceilings: Dict[str, Any],
                 progress: _Progress, graph: bool) -> Dict[str, Any]:
    """Fill ``row`` with the reference's status and every peer's record and derived figures."""
    row.update(group=workload.group, name=workload.name, shape=workload.shape, dims=workload.dims,
               bytes=workload.bytes, flops=workload.flops, items=workload.items, item_unit=workload.item_unit)
    reference, reference_status = None, "none"
    if workload.reference is not None:
        progress.describe(f"{workload.name}[{workload.shape}] reference")
        start = time.perf_counter()
        try:
            reference = workload.reference()
            _synchronize(ctx)
            reference_status = "ok"
            row["reference"] = {"status": "ok", "seconds": time.perf_counter() - start}
        except Exception as err:
            reference_status = f"the reference failed: {describe_error(err)}"
            row["reference"] = {"status": "failed", "reason": describe_error(err)}
            if is_out_of_memory(err):
                release_memory(ctx)
    else:
        row["reference"] = {"status": "none"}
    for peer in workload.peers:
        progress.describe(f"{workload.name}[{workload.shape}] {peer.name}")
        row["peers"].append(_run_peer(peer, workload, ctx, reference, reference_status, ceilings, graph))
        progress.advance()
    _speedups(row)
    return row


def _reset_compiled_code() -> None:
    """Forget torch.compile's caches between workloads, so that recompilations of one workload never
    exhaust dynamo's recompile limit and silently run a later "compile" peer eagerly."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def run(cases: Sequence[Case], ctx: Context, *, progress: bool = True, graph: bool = False,
        settings: Optional[Dict[str, Any]] = None, ceilings: Optional[Dict[str, Any]] = None,
        on_row: Optional[Callable[["BenchRun"], None]] = None, skip_peers: Sequence[str] = ()) -> BenchRun:
    """Run every shape of every case (``case.shapes_for(ctx)``) on ``ctx.device`` and return the record.

    ``graph``: also time each peer's CUDA-graph replay (GPU only). ``settings``: extra JSON-able values to
    keep in the record (the command line's choices). ``ceilings``: reuse figures measured earlier instead
    of measuring them now. ``on_row`` is called with the record after each finished row (its ``seconds``
    so far), e.g. to save partial results. ``skip_peers``: peer names not to
    run (recorded as skipped, e.g. ``compile-max-autotune``, whose autotuning takes minutes per shape)."""
    start = time.perf_counter()
    record = BenchRun(environment=environment(ctx.device),
                      ceilings=ceilings if ceilings is not None else measure_ceilings(ctx, ctx.quick),
                      context=ctx.describe(),
                      settings={"graph": bool(graph and ctx.device.type == "cuda"),
                                "cases": [case.name for case in cases], **(settings or {})})
    jobs = [(case, shape, params) for case in cases for shape, params in case.shapes_for(ctx).items()]
    bar = _Progress(total=len(jobs), enabled=progress)
    try:
        for case, shape, params in jobs:
            row = _workload_row(case, shape)
            bar.describe(f"{case.name}[{shape}] make")
            try:
                workload = case.make(ctx, shape, params)
            except Exception as err:  # the workload could not be built: recorded, the run goes on
                row.update(status="failed", reason=describe_error(err), fastdit_peer=None, fastdit_speedup={},
                           fastest_stock=None)
                if is_out_of_memory(err):
                    release_memory(ctx)
                bar.advance()
            else:
                workload.peers = [Peer(p.name, None, "skipped on request (--skip-peers)") if p.name in skip_peers
                                  else p for p in workload.peers]
                if workload.peers:
                    bar.grow(len(workload.peers) - 1)
                else:
                    bar.advance()
                run_workload(workload, ctx, row, record.ceilings, bar, graph)
                del workload
            record.rows.append(row)
            if on_row is not None:
                record.seconds = time.perf_counter() - start
                on_row(record)
            _reset_compiled_code()
            release_memory(ctx)
    finally:
        bar.close()
    record.seconds = time.perf_counter() - start
    return record

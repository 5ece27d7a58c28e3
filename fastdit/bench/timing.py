"""Timing, memory, ceilings and the environment record of a bench run.

The figure of record on a GPU is ``triton.testing.do_bench``: CUDA events around each call, L2 flushed
between calls, the median over the repeats with the 20th/80th percentiles as the spread. Each workload's
bytes or FLOPs are turned into GB/s or TFLOP/s and set against ceilings measured in the same process
(device copy bandwidth, bf16 and fp8 matmul rates).

On the CPU the same functions run so that the code path is exercised, but ``time.perf_counter`` over a few
calls of tiny shapes (often through Triton's interpreter) measures nothing about a GPU: every CPU figure
is labelled as meaningless.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

GPU_TIMER = "triton.testing.do_bench median (CUDA events, L2 flushed between calls)"
CPU_TIMER = "time.perf_counter on the CPU: MEANINGLESS (tiny shapes, Triton interpreter; not a GPU figure)"


@dataclass
class Timing:
    """Milliseconds per call: the median ``ms`` with the 20th/80th percentiles, over ``repeats`` calls,
    and which clock measured them (``timer``)."""
    ms: float
    p20: float
    p80: float
    repeats: int
    timer: str = GPU_TIMER


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _summarize(times_ms: List[float], timer: str) -> Timing:
    ordered = sorted(float(t) for t in times_ms)
    return Timing(ms=statistics.median(ordered), p20=_quantile(ordered, 0.2), p80=_quantile(ordered, 0.8),
                  repeats=len(ordered), timer=timer)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], ctx, *, quick: bool, warm_up: bool = True) -> Timing:
    """Time ``fn`` on ``ctx.device``.

    GPU: ``do_bench`` (which warms up for 25 ms, 5 when ``quick``) over ~100 ms of repeats (20 ms when
    quick) and at least 5 calls (3 when quick) however slow one call is. CPU: one warm-up call (none when
    ``warm_up=False``: the caller has just called ``fn``), then ``time.perf_counter`` around 3 calls (10
    when not quick); the result is labelled meaningless."""
    if ctx.device.type != "cuda":
        if warm_up:
            fn()
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return _summarize(times, CPU_TIMER)
    from triton.testing import do_bench

    warmup_ms, rep_ms, min_repeats = (5.0, 20.0, 3) if quick else (25.0, 100.0, 5)
    _synchronize(ctx.device)
    start = time.perf_counter()
    fn()
    _synchronize(ctx.device)
    estimate_ms = (time.perf_counter() - start) * 1e3
    rep_ms = max(rep_ms, 1.1 * min_repeats * estimate_ms)
    times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return _summarize(list(times), GPU_TIMER)


def time_cuda_graph(build: Callable[[], Callable[[], Any]], calls: int = 10, replays: int = 10
                    ) -> Tuple[Optional[float], Optional[str]]:
    """Median ms of one call replayed from a CUDA graph: the GPU time alone, without the host's launch
    and dispatch overhead, with L2 flushed before every call (as do_bench does).

    ``build()`` returns the callable; it runs on the capture stream (a backward must run on the stream
    its forward ran on). Each replay runs [flush, fn] x ``calls``; a second graph of flushes alone is
    subtracted. Returns (ms, None), or (None, the reason) when ``fn`` cannot be captured or there is
    no GPU."""
    if not torch.cuda.is_available():
        return None, "CUDA-graph replay needs a CUDA GPU"
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            fn = build()
            for _ in range(3):  # warm-up: compilation, allocator, autotuning
                fn()
            stream.synchronize()
            graphs = []
            for with_fn in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(calls):
                        flush.zero_()
                        if with_fn:
                            fn()
                graphs.append(graph)
        torch.cuda.synchronize()
    except Exception as err:  # capture refused: report no figure (and why) rather than a wrong one
        torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {str(err)[:300]}"
    medians = []
    for graph in graphs:
        graph.replay()  # warm
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        medians.append(sorted(times)[len(times) // 2])
    return max(medians[0] - medians[1], 0.0) / calls, None


def peak_memory(fn: Callable[[], Any], ctx) -> Optional[int]:
    """Bytes of device memory one call of ``fn`` allocates at its peak, above what was allocated before
    it (inputs and weights are not counted; what the call keeps alive is). ``None`` on the CPU."""
    if ctx.device.type != "cuda":
        return None
    torch.cuda.synchronize(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device)
    result = fn()
    torch.cuda.synchronize(ctx.device)
    peak = torch.cuda.max_memory_allocated(ctx.device) - before
    del result
    return int(max(peak, 0))


def _median_ms(fn: Callable[[], Any], ctx, quick: bool) -> float:
    fn()
    return time_callable(fn, ctx, quick=quick).ms


def measure_copy_bandwidth(ctx, quick: bool) -> float:
    """Device copy of one buffer into another, counting bytes read + written, in GB/s (1 GiB on the GPU,
    256 MiB when quick; 16 MiB on the CPU)."""
    nbytes = (256 * 2**20 if quick else 2**30) if ctx.device.type == "cuda" else 16 * 2**20
    x = torch.empty(nbytes // 2, device=ctx.device, dtype=torch.bfloat16).normal_(generator=ctx.generator())
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x), ctx, quick)
    return 2 * nbytes / ms / 1e6


def measure_matmul_rate(ctx, quick: bool) -> float:
    """bf16 n x n x n matmul on random data in TFLOP/s (n = 8192 on the GPU, 4096 when quick; 256 on
    the CPU)."""
    n = (4096 if quick else 8192) if ctx.device.type == "cuda" else 256
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=ctx.generator())
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=ctx.generator())
    ms = _median_ms(lambda: a @ b, ctx, quick)
    return 2 * n**3 / ms / 1e9


def fp8_matmul_unsupported(ctx) -> Optional[str]:
    """Why an fp8 ``torch._scaled_mm`` cannot run here, or None when it can."""
    if ctx.device.type != "cuda":
        return "fp8 matmul needs a CUDA GPU"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no torch._scaled_mm / float8_e4m3fn"
    capability = torch.cuda.get_device_capability(ctx.device)
    if capability < (8, 9):
        return f"fp8 matmul needs compute capability 8.9+ (Ada, Hopper); this GPU is {capability[0]}.{capability[1]}"
    return None


def measure_fp8_matmul_rate(ctx, quick: bool) -> float:
    """fp8 (e4m3) n x n x n ``torch._scaled_mm`` with tensorwise scales and bf16 output, TFLOP/s."""
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=ctx.device, generator=ctx.generator()).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=ctx.device, generator=ctx.generator()).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=ctx.device, dtype=torch.float32)
    ms = _median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                    ctx, quick)
    return 2 * n**3 / ms / 1e9


def ceilings(ctx, quick: bool) -> Dict[str, Any]:
    """The ceilings a run's rates are set against, measured now on ``ctx.device``:
    ``copy_GBps``, ``bf16_matmul_TFLOPs`` and ``fp8_matmul_TFLOPs`` (None when fp8 cannot run here or its
    measurement failed; ``skipped`` maps each missing ceiling to the reason). ``label`` says what the
    figures are (on the CPU: meaningless)."""
    result: Dict[str, Any] = {"copy_GBps": None, "bf16_matmul_TFLOPs": None, "fp8_matmul_TFLOPs": None,
                              "skipped": {}}
    measures = {"copy_GBps": measure_copy_bandwidth, "bf16_matmul_TFLOPs": measure_matmul_rate,
                "fp8_matmul_TFLOPs": measure_fp8_matmul_rate}
    for key, measure in measures.items():
        reason = fp8_matmul_unsupported(ctx) if key == "fp8_matmul_TFLOPs" else None
        if reason is None:
            try:
                result[key] = float(measure(ctx, quick))
            except Exception as err:  # a ceiling that cannot be measured is reported, not fatal
                reason = f"{type(err).__name__}: {str(err)[:300]}"
        if reason is not None:
            result["skipped"][key] = reason
    if ctx.device.type == "cuda":
        result["label"] = f"measured in this run on {torch.cuda.get_device_name(ctx.device)}"
    else:
        result["label"] = "measured on the CPU: MEANINGLESS as a GPU ceiling (tiny buffers, perf_counter)"
    return result


def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def _torch_driver() -> Optional[str]:
    """The CUDA driver API version torch sees (e.g. "CUDA driver API 12.4"), when nvidia-smi is absent."""
    try:
        version = int(torch._C._cuda_getDriverVersion())
    except Exception:
        return None
    return f"CUDA driver API {version // 1000}.{(version % 1000) // 10}" if version > 0 else None


def git_commit() -> Optional[str]:
    """The commit of the tree that runs: ``FASTDIT_GIT_COMMIT`` first (a copy of the tree travels without
    ``.git``), else ``git rev-parse HEAD`` in the package's repository, else None."""
    commit = os.environ.get("FASTDIT_GIT_COMMIT", "").strip()
    if commit:
        return commit
    import fastdit

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(fastdit.__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: "Optional[torch.device | str]" = None) -> Dict[str, Any]:
    """What ran the bench: GPU (name, SMs, memory), driver, CUDA, cuDNN, torch, triton, python, fastdit
    version, the git commit, date and time (UTC), and the timer. ``device`` defaults to the current CUDA
    device when there is one, else the CPU."""
    import fastdit

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        cudnn = None
    now = datetime.datetime.now(datetime.timezone.utc)
    env: Dict[str, Any] = {
        "device": device.type,
        "gpu": None, "sm_count": None, "gpu_memory_GiB": None, "compute_capability": None, "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "fastdit": fastdit.__version__,
        "git_commit": git_commit(),
        "date": now.date().isoformat(),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timer": GPU_TIMER if device.type == "cuda" else CPU_TIMER,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=torch.cuda.get_device_name(index), sm_count=props.multi_processor_count,
                   gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   driver=_nvidia_smi_driver() or _torch_driver())
    return env


def gpu_slug(device: "Optional[torch.device | str]" = None) -> str:
    """A file-name form of the GPU's name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; "cpu" on the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return slugify_gpu_name(torch.cuda.get_device_name(device.index if device.index is not None else None))


def slugify_gpu_name(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3" (vendor prefix dropped, lower case, runs of other
    characters as one dash)."""
    name = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"

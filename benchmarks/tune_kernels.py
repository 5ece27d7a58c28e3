"""Sweep launch configurations of the memory-bound kernels on the GPU and measure host overhead.

    python benchmarks/tune_kernels.py [adaln] [qk] [overhead] --out DIR

Kernel times are CUDA-graph replays with L2 flushed between calls (GPU time only); GB/s counts each
x-sized tensor read or written once. Prints the best configuration per shape and writes everything
to DIR/tune.json. This is a development tool: the launchers' defaults come from what it finds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from fastdit.bench.registry import Context
from fastdit.bench.timing import environment, measure_copy_bandwidth, time_cuda_graph
from fastdit.kernels.adaln import adaln_bwd, adaln_fwd
from fastdit.kernels.qk_norm_rope import qk_norm_rope_bwd, qk_norm_rope_fwd
from fastdit.ops import rope_freqs_2d

ADALN_SHAPES = [(64, 256, 1152), (2, 4096, 3072), (8, 4608, 1536)]
QK_SHAPES = [(2, 4608, 24, 128), (64, 256, 16, 72)]  # (B, N, H, d)


def gbps(nbytes, ms):
    return None if ms is None or ms <= 0 else nbytes / ms / 1e6


def sweep(name, shape, nbytes, configs, make_fn, results, copy):
    best = None
    for cfg in configs:
        try:
            ms, why_not = time_cuda_graph(lambda: make_fn(**cfg))
            if ms is None:
                raise RuntimeError(why_not)
        except Exception as err:  # an invalid config (too many registers…) is skipped, not fatal
            print(f"  {name} {shape} {cfg}: failed: {type(err).__name__}: {str(err)[:80]}")
            continue
        rate = gbps(nbytes, ms)
        results.append({"kernel": name, "shape": shape, "config": cfg, "ms": ms, "GBps": rate})
        if rate and (best is None or rate > best[1]):
            best = (cfg, rate, ms)
    if best:
        print(f"{name:14s} {str(shape):22s} best {best[0]} {best[1]:,.0f} GB/s ({100 * best[1] / copy:.0f}% of copy),"
              f" {best[2] * 1e3:.1f} us")


def tune_adaln(results, copy, backward=True):
    for B, N, D in ADALN_SHAPES:
        x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(x)
        sh, sc, g = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        xb = x.numel() * 2
        fwd_cfgs = [dict(block_m=m, num_warps=w, steps=t, split=p)
                    for m, w, t, p in itertools.product((1, 2), (2, 4, 8), (1, 4), (False, True))]
        sweep("adaln.fwd", (B, N, D), 2 * xb, fwd_cfgs,
              lambda **c: (lambda: adaln_fwd(x, sh, sc, 1e-6, **c)), results, copy)
        sweep("gated.fwd", (B, N, D), 4 * xb, fwd_cfgs,
              lambda **c: (lambda: adaln_fwd(x, sh, sc, 1e-6, res=y, gate=g, **c)), results, copy)
        if not backward:
            continue
        _, mean, rstd = adaln_fwd(x, sh, sc, 1e-6)
        xn, _, gmean, grstd = adaln_fwd(x, sh, sc, 1e-6, res=y, gate=g)
        dy, dxn = torch.randn_like(x), torch.randn_like(x)
        bwd_cfgs = [dict(block_m=m, num_warps=w, programs_per_sm=p, min_rows=r)
                    for m, w, p, r in itertools.product((1, 2, 4), (2, 4, 8), (2, 4, 8, 16), (16, 64))]
        sweep("adaln.bwd", (B, N, D), 3 * xb, bwd_cfgs,
              lambda **c: (lambda: adaln_bwd(dy, x, sh, sc, mean, rstd, **c)), results, copy)
        sweep("gated.bwd", (B, N, D), 6 * xb, bwd_cfgs,
              lambda **c: (lambda: adaln_bwd(dy, xn, sh, sc, gmean, grstd, res=y, gate=g, dx_new=dxn, **c)),
              results, copy)


def tune_qk(results, copy):
    for B, N, H, d in QK_SHAPES:
        qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        w = torch.randn(d, device="cuda")
        freqs = rope_freqs_2d(N // 64, 64, d, device="cuda")
        qb = q.numel() * 2
        warps = [dict(num_warps=n, tokens=t) for n, t in itertools.product((2, 4), (1, 2))]
        sweep("rope_qk.fwd", (B, N, H, d), 4 * qb, warps,
              lambda **c: (lambda: qk_norm_rope_fwd(q, k, freqs=freqs, **c)), results, copy)
        sweep("qknorm_rope.fwd", (B, N, H, d), 4 * qb, warps,
              lambda **c: (lambda: qk_norm_rope_fwd(q, k, w, w, freqs, **c)), results, copy)
        _, _, qr, kr = qk_norm_rope_fwd(q, k, w, w, freqs)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        bwd_cfgs = [dict(num_warps=n, tokens=t) for n, t in itertools.product((2, 4), (1, 2, 4))]
        sweep("qknorm_rope.bwd", (B, N, H, d), 6 * qb, bwd_cfgs,
              lambda **c: (lambda: qk_norm_rope_bwd(dq, dk, q, k, w, w, freqs, qr, kr, **c)), results, copy)


def host_overhead(results):
    """Host time per call at a tiny size (GPU work negligible): where the microseconds go."""
    from fastdit.ops import adaln_modulate

    x = torch.randn(1, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sh, sc = (torch.randn(1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def per_call(fn, n=3000):
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e6

    dy = torch.randn_like(x)
    with torch.no_grad():
        rows = {
            "F.layer_norm eager (for scale), no_grad": per_call(lambda: torch.nn.functional.layer_norm(x, (64,))),
            "launcher adaln_fwd, no_grad": per_call(lambda: adaln_fwd(x, sh, sc, 1e-6)),
            "adaln_modulate(backend='triton'), no_grad": per_call(lambda: adaln_modulate(x, sh, sc, backend="triton")),
            "torch.ops.fastdit.adaln_modulate, no_grad": per_call(
                lambda: torch.ops.fastdit.adaln_modulate(x, sh, sc, 1e-6)),
        }
    rows["adaln_modulate(backend='triton'), with grad"] = per_call(lambda: adaln_modulate(x, sh, sc, backend="triton"))
    rows["torch.ops.fastdit.adaln_modulate, with grad"] = per_call(
        lambda: torch.ops.fastdit.adaln_modulate(x, sh, sc, 1e-6))
    rows["fwd+bwd adaln_modulate(backend='triton')"] = per_call(
        lambda: torch.autograd.grad(adaln_modulate(x, sh, sc, backend="triton"), (x, sh, sc), dy))
    rows["fwd+bwd torch.ops.fastdit.adaln_modulate"] = per_call(
        lambda: torch.autograd.grad(torch.ops.fastdit.adaln_modulate(x, sh, sc, 1e-6)[0], (x, sh, sc), dy))
    rows["fwd+bwd F.layer_norm eager (for scale)"] = per_call(
        lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (64,)), (x,), dy))
    for name, us in rows.items():
        print(f"host overhead: {name:48s} {us:7.1f} us/call")
        results.append({"kernel": "host_overhead", "what": name, "us_per_call": us})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="*", default=["overhead", "adaln", "qk"])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    copy = measure_copy_bandwidth(Context.create("cuda"), quick=False)
    print(f"copy bandwidth {copy:,.0f} GB/s on {torch.cuda.get_device_name()}")
    results = []
    for part, run in (("overhead", lambda: host_overhead(results)), ("adaln", lambda: tune_adaln(results, copy)),
                      ("adaln-fwd", lambda: tune_adaln(results, copy, backward=False)),
                      ("qk", lambda: tune_qk(results, copy))):
        if part in args.parts:
            run()
            with open(os.path.join(args.out, "tune.json"), "w") as f:  # after each part: a timeout keeps it
                json.dump({**environment(), "copy_GBps": copy, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Sweep launch configurations of the joint-attention kernels on the GPU (forward, and the backward's two
kernels together) at the benchmark shapes; prints TFLOP/s per configuration and writes DIR/tune.json.

    python benchmarks/tune_attention.py [fwd] [bwd] [bwd-dq] [bwd-dkdv] --out DIR [--shapes flux1024,dit-xl256]

bwd sweeps one configuration for both backward kernels; bwd-dq sweeps the dq kernel's with the dk/dv kernel
at its default, bwd-dkdv (``--dkdv-configs``) the dk/dv kernel's with the dq kernel at its default.

FLOPs as in the benchmarks: forward 4·B·H·N²·d, backward 2.5× that. bf16, CUDA-graph replay (so that the
launcher's host time does not hide the small shapes' kernel time), after one eager call that compiles.
A development tool: the launchers' defaults come from what it finds.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from fastdit.bench.timing import environment
from fastdit.kernels.attention import Stream, _config, attention_bwd, attention_fwd

SHAPES = {"flux1024": (1, 24, 4096, 512, 128), "sd3_1024": (2, 24, 4096, 154, 64), "dit-xl256": (64, 16, 256, 0, 72),
          "dit512": (8, 16, 1024, 0, 64), "long": (1, 24, 16384, 0, 128)}
FWD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3),
       (64, 128, 4, 2), (128, 128, 8, 2), (64, 32, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4)]
BWD = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 1),
       (64, 64, 4, 1), (64, 64, 4, 3), (32, 32, 4, 2)]


def streams(B, H, n_img, n_txt, d):
    def make(n):
        qkv = torch.randn(B, n, 3, H, d, device="cuda", dtype=torch.bfloat16)
        return qkv.unbind(2)

    lengths = torch.tensor([max(0, n_txt - 37) if b % 2 == 0 else n_txt for b in range(B)], device="cuda")
    mask = (torch.arange(n_txt, device="cuda")[None, :] < lengths[:, None]).to(torch.int8)
    return Stream(*make(n_txt), mask=mask if n_txt else None), Stream(*make(n_img))


def parse_configs(text: str):
    """'128,64,8,3;64,64,4,2' -> [(128, 64, 8, 3), (64, 64, 4, 2)]: (BLOCK_M, BLOCK_N, warps, stages);
    'default' stands for the launcher's own choice."""
    try:
        configs = [(None,) * 4 if part.strip() == "default" else tuple(int(x) for x in part.split(","))
                   for part in text.split(";") if part.strip()]
    except ValueError:
        configs = []
    if not configs or any(len(c) != 4 for c in configs):
        raise argparse.ArgumentTypeError(f"expected 'M,N,WARPS,STAGES;...', got {text!r}")
    return configs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="*", default=["fwd", "bwd"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--fwd-configs", type=parse_configs, default=FWD,
                        help="forward configurations instead of the built-in sweep: 'M,N,WARPS,STAGES;...'")
    parser.add_argument("--bwd-configs", type=parse_configs, default=BWD, help="the same for the backward")
    parser.add_argument("--dkdv-configs", type=parse_configs, default=BWD,
                        help="part bwd-dkdv: dk/dv-kernel configurations (M = queries streamed, N = keys held), "
                             "swept with the dq kernel at its default")
    args = parser.parse_args()
    results = []
    for name in args.shapes.split(","):
        B, H, n_img, n_txt, d = SHAPES[name]
        txt, img = streams(B, H, n_img, n_txt, d)
        N = n_img + n_txt
        flops = 4 * B * H * N * N * d
        scale = d ** -0.5
        o_img, o_txt, lse = attention_fwd(txt, img, scale, 1e-6, True)
        do_img, do_txt = torch.randn_like(o_img), torch.randn_like(o_txt)
        default_dkdv = _config(d, torch.bfloat16, torch.device("cuda"), None, None, None, None, "dkdv")
        for part, configs, mult in (("fwd", args.fwd_configs, 1.0), ("bwd", args.bwd_configs, 2.5),
                                    ("bwd-dq", args.bwd_configs, 2.5), ("bwd-dkdv", args.dkdv_configs, 2.5)):
            if part not in args.parts:
                continue
            best = None
            for bm, bn, w, st in configs:
                kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                if part == "bwd-dq":  # the dq kernel's configuration; dk/dv at its default
                    kw["dkdv_config"] = default_dkdv
                elif part == "bwd-dkdv":
                    kw = dict(dkdv_config=(bm, bn, w, st))
                if part == "fwd":
                    fn = (lambda kw=kw: attention_fwd(txt, img, scale, 1e-6, True, **kw))
                else:
                    fn = (lambda kw=kw: attention_bwd(do_img, do_txt, txt, img, o_img, o_txt, lse, scale, 1e-6, True,
                                                      **kw))
                try:
                    fn()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench_cudagraph(fn, rep=50)
                except Exception as err:  # out of shared memory / registers: skip the configuration
                    print(f"  {name} {part} {kw}: failed: {type(err).__name__}: {str(err)[:100]}", flush=True)
                    continue
                tflops = flops * mult / ms / 1e9
                results.append({"shape": name, "part": part, "config": kw, "ms": ms, "TFLOPs": tflops})
                print(f"  {name:10s} {part} {kw}: {ms:.3f} ms {tflops:6.1f} TFLOP/s", flush=True)
                if best is None or tflops > best[1]:
                    best = (kw, tflops)
            if best:
                print(f"{name:10s} {part} best {best[0]} {best[1]:.1f} TFLOP/s", flush=True)
            with open(os.path.join(args.out, "tune.json"), "w") as fh:
                json.dump({**environment(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()

"""DDP scaling of ``fastdit train`` on one host: throughput of N GPUs against one, and the loss curve of
N × batch against 1 × (N · batch).

    python benchmarks/ddp_scaling.py --gpus 2 --out DIR          # DiT-B/2, synthetic 4×32×32 latents

Runs ``torchrun --standalone -m fastdit.cli train`` (NCCL DDP, bf16, per-block compile, EMA, grad clip):

- ``1gpu_b``: one GPU, per-rank batch b;  ``Ngpu_b``: N GPUs, per-rank batch b (global N·b);
- ``1gpu_Nb``: one GPU, batch N·b (the same global batch as ``Ngpu_b``), and ``1gpu_Nb_seed1``, the same
  with another seed: the run-to-run noise the DDP curve is judged against;
- on request (``--runs``): ``Ngpu_b_split`` (compiled blocks split at DDP buckets by dynamo's
  DDPOptimizer, torch's default), ``Ngpu_b_eager`` and ``1gpu_Nb_eager`` (no compile).

Throughput is the trainer's own step times (``logging.every=1``) after ``--warmup-steps`` steps
(compilation, warm-up). Scaling efficiency = images/s(N GPUs) / (N × images/s(1 GPU)), same per-GPU batch. The loss
comparison uses per-step losses (mean over ranks) smoothed over windows of ``--window`` steps: the mean
absolute gap between ``Ngpu_b`` and ``1gpu_Nb`` next to the gap between the two seeds of ``1gpu_Nb``,
and the step at which each run leaves the early loss plateau (``plateau_exit``).
Writes ``ddp_scaling.json``, ``ddp_loss.png`` and ``train_logs.txt`` (every run's output) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_training(name: str, gpus: int, batch: int, seed: int, args, out: Path, *, compile: bool = True,
                 ddp_split: bool = False) -> Dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "fastdit.cli", "train", "--output-dir", str(run_dir), "--max-steps", str(args.steps),
           "--seed", str(seed + args.seed_offset), "--resume", "none", "--compile" if compile else "--no-compile",
           "--set", f"model.name={args.model}", "--set", f"data.batch_size={batch}",
           "--set", f"data.latent_shape={args.latent_shape}", "--set", "logging.every=1",
           "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
           "--set", "checkpoint.every=0", "--set", "checkpoint.save_final=false", "--set", f"run.device={args.device}",
           "--set", f"run.compile_ddp_split={str(ddp_split).lower()}"]
    if args.data_prefetch is not None:
        cmd += ["--set", f"data.prefetch={args.data_prefetch}"]
    for override in args.set:
        cmd += ["--set", override]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    if args.omp_threads:  # torchrun sets 1 per rank unless told otherwise
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(out / "train_logs.txt", "a") as log:  # one file for all runs (fewer files to copy back)
        log.write(f"==== {name}: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see train_logs.txt:\n{proc.stderr[-2000:]}")
    from fastdit.training.metrics import read_jsonl
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    steps = [r for r in records if "images_per_s" in r]  # logging.every=1: one record per step
    rates = [r for r in steps if r["step"] > args.warmup_steps]
    losses = {int(r["step"]): float(r["loss"]) for r in steps if r.get("loss") is not None}
    if not args.keep_run_dirs:
        shutil.rmtree(run_dir)
    img_s = len(rates) * gpus * batch / sum(r["step_time_s"] for r in rates)
    times = sorted(1e3 * r["step_time_s"] for r in rates)
    spread = {f"step_ms_p{q}": times[min(len(times) - 1, int(q / 100 * len(times)))] for q in (10, 50, 90)}
    row = {"name": name, "gpus": gpus, "batch_per_gpu": batch, "global_batch": gpus * batch,
           "seed": seed + args.seed_offset,
           "compile": compile, "ddp_split": ddp_split, "plateau_exit_step": plateau_exit(losses, args.window),
           "images_per_s": img_s, "step_ms": 1e3 * gpus * batch / img_s, "mfu": rates[-1].get("mfu"),
           **spread, "step_ms_each": [round(1e3 * r["step_time_s"], 3) for r in steps],
           "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in rates), "wall_s": wall,
           "omp_num_threads": env.get("OMP_NUM_THREADS", "torchrun's default"),
           "loss": [losses[s] for s in sorted(losses)]}
    print(f"{name:16s} {gpus} GPU × {batch:4d}: {img_s:8.1f} img/s ({row['step_ms']:.1f} ms/step; p10/p50/p90 "
          f"{spread['step_ms_p10']:.1f}/{spread['step_ms_p50']:.1f}/{spread['step_ms_p90']:.1f}), "
          f"final loss {row['loss'][-1]:.4f}, leaves the plateau at step {row['plateau_exit_step']}, "
          f"wall {wall:.0f}s", flush=True)
    return row


def gaussian_floor(samples: int = 10**7) -> float:
    """The lowest expected rectified-flow loss on SyntheticLatents (standard-normal latents, labels that
    carry no information) with the default logit-normal(0, 1) times: E_t[Var(z1 - z0 | z_t)] per element,
    = E_t[2 - (2t - 1)^2 / ((1 - t)^2 + t^2)] (Monte Carlo over t). A run that has learnt all there is to
    learn sits here; a curve above it is still learning."""
    t = torch.sigmoid(torch.randn(samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return float((2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t ** 2)).mean())


def plateau_exit(losses: Dict[int, float], window: int, level: float = 1.80) -> Optional[int]:
    """The first step from which the mean loss over the next ``window`` steps is below ``level``: halfway
    between the early plateau these runs share (~1.87) and the Gaussian floor (1.741). None if the run
    never gets there."""
    steps = sorted(losses)
    for i in range(len(steps) - window + 1):
        if sum(losses[s] for s in steps[i:i + window]) / window < level:
            return steps[i]
    return None


def smooth(values: List[float], window: int) -> List[float]:
    return [sum(values[i:i + window]) / len(values[i:i + window]) for i in range(0, len(values), window)]


def mean_abs_gap(a: List[float], b: List[float]) -> float:
    n = min(len(a), len(b))
    return sum(abs(x - y) for x, y in zip(a[:n], b[:n])) / n


def plot(curves: Dict[str, List[float]], window: int, path: Path) -> None:
    """Smoothed loss curves as a PNG (Pillow only: the GPU machines have no matplotlib)."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 500, 60
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo = min(min(c) for c in curves.values())
    hi = max(max(c) for c in curves.values())
    n = max(len(c) for c in curves.values())
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    draw.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    for i, (name, c) in enumerate(curves.items()):
        pts = [(pad + (W - 1.5 * pad) * j / max(1, n - 1), H - pad - (H - 1.5 * pad) * (v - lo) / max(1e-12, hi - lo))
               for j, v in enumerate(c)]
        draw.line(pts, fill=colors[i % len(colors)], width=2)
        draw.text((W - 330, pad // 2 + 10 + 16 * i), name, fill=colors[i % len(colors)])
    draw.text((pad, H - pad + 10), f"step (x{window}), loss from {lo:.4f} to {hi:.4f}", fill="black")
    img.save(path)


def run_specs(N: int, b: int) -> Dict[str, tuple]:
    """name (N stands for the GPU count) -> (gpus, batch per GPU, seed, run_training options). ``compile``
    follows --compile except in the ``_eager`` runs; ``_split`` lets dynamo's DDPOptimizer split the
    compiled blocks at DDP bucket boundaries (``run.compile_ddp_split=true``; the trainer's default is not to)."""
    return {"1gpu_b": (1, b, 0, {}), "Ngpu_b": (N, b, 0, {}), "1gpu_Nb": (1, N * b, 0, {}),
            "1gpu_Nb_seed1": (1, N * b, 1, {}), "Ngpu_b_split": (N, b, 0, {"ddp_split": True}),
            "Ngpu_b_eager": (N, b, 0, {"compile": False}), "1gpu_Nb_eager": (1, N * b, 0, {"compile": False})}


def summarize(runs: Dict[str, Dict], N: int, window: int) -> Dict:
    """Scaling efficiency of each N-GPU run against ``1gpu_b`` (same per-GPU batch, same compile
    setting), and the mean absolute gap between smoothed loss curves of the pairs that should match."""
    out: Dict = {"loss_floor_gaussian_latents": gaussian_floor(), "smoothing_window_steps": window,
                 "final_window_loss": {r["name"]: smooth(r["loss"], window)[-1] for r in runs.values()},
                 "plateau_exit_step": {r["name"]: r["plateau_exit_step"] for r in runs.values()}}
    one = runs.get("1gpu_b")
    for r in runs.values():
        if one and r["gpus"] == N and N > 1 and r["compile"]:
            out[f"scaling_efficiency_{r['name']}"] = r["images_per_s"] / (N * one["images_per_s"])
    pairs = [("Ngpu_b", "1gpu_Nb"), ("1gpu_Nb_seed1", "1gpu_Nb"), ("Ngpu_b_split", "1gpu_Nb"),
             ("Ngpu_b_eager", "1gpu_Nb_eager")]
    for a, b in pairs:
        if a in runs and b in runs:
            ca, cb = smooth(runs[a]["loss"], window), smooth(runs[b]["loss"], window)
            out[f"loss_gap_{runs[a]['name']}_vs_{runs[b]['name']}"] = mean_abs_gap(ca, cb)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch of the scaling runs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup-steps", type=int, default=30, help="steps left out of the throughput")
    parser.add_argument("--window", type=int, default=25, help="steps per point of the smoothed loss curves")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a gloo smoke run")
    parser.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS per rank (0: torchrun's choice)")
    parser.add_argument("--data-prefetch", type=int, default=None, help="data.prefetch (default: the trainer's)")
    parser.add_argument("--latent-shape", default="4,32,32", help="C,H,W of the synthetic latents")
    parser.add_argument("--keep-run-dirs", action="store_true",
                        help="keep each run's folder (metrics.jsonl, config.json); by default they are removed once "
                             "read: the record holds the per-step losses and times")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every run's seed (repeat a comparison)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further `fastdit train --set` override for every run (repeatable)")
    parser.add_argument("--runs", nargs="+", default=["1gpu_b", "Ngpu_b", "1gpu_Nb", "1gpu_Nb_seed1"],
                        help="which runs, in order (see run_specs; N stands for --gpus)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    N, b = args.gpus, args.batch
    specs = run_specs(N, b)
    unknown = [name for name in args.runs if name not in specs]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(specs)}")
    runs: Dict[str, Dict] = {}
    for name in args.runs:  # the record is rewritten after every run: a cut-off session keeps what finished
        gpus, batch, seed, options = specs[name]
        options = {"compile": args.compile, **options}
        runs[name] = run_training(name.replace("N", str(N)), gpus, batch, seed, args, out, **options)
        summary = summarize(runs, N, args.window)
        curves = {r["name"]: smooth(r["loss"], args.window) for r in runs.values()}
        record = {"benchmark": "ddp_scaling", "model": args.model, "steps": args.steps,
                  "omp_threads": args.omp_threads or None, "data_prefetch": args.data_prefetch,
                  "gpus": N, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                  "torch": torch.__version__, "summary": summary, "runs": list(runs.values()), "curves": curves}
        try:
            from fastdit.bench.timing import environment
            record = {**environment(args.device), **record}
        except Exception as err:  # the record is still useful without the environment block
            record["environment_error"] = repr(err)
        (out / "ddp_scaling.json").write_text(json.dumps(record, indent=1) + "\n")
        plot(curves, args.window, out / "ddp_loss.png")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step throughput: fastdit against the stock-PyTorch peers of ``stock_models.py``, one process.

    python benchmarks/train_step.py dit   --out DIR   # DiT-XL/2, 256 px (latents 4×32×32), batch 128
    python benchmarks/train_step.py mmdit --out DIR   # 8 Flux-style double blocks, 1024 px, batch 1
    python benchmarks/train_step.py dit-forward --out DIR  # DiT-XL/2 inference forward, batch 64
    python benchmarks/train_step.py dit --tiny        # a small CPU smoke run of the same code

Every variant runs the baseline's step: bf16 autocast forward, MSE on float32 outputs, backward, fused
AdamW (on CUDA), ``set_to_none`` zeroing; a few warm-up steps, then wall time over ``--steps`` with the
device synchronised at both ends. Variants:

- ``stock-eager`` / ``stock-compile``: the baseline model, eager and ``torch.compile(model)``;
- ``fastdit-<backend>-<compile>``: fastdit's model with that module backend (``auto``: Triton kernels
  on CUDA; ``reference``: plain PyTorch), compiled per block (``blocks``, what the trainer does) or as a
  whole (``model``);
- ``stock-max-autotune`` (with ``--max-autotune``): ``torch.compile(model, mode="max-autotune-no-cudagraphs")``;
- ``dit-forward``: inference instead of training: one bf16-autocast forward under ``no_grad`` (batch 64 by
  default, as CFG's 2 × 32), the same variants;
- ``fastdit-trainer`` (dit only): ``fastdit.training.Trainer.fit`` on synthetic latents — rectified-flow
  loss, gradient clipping, EMA, the agreed non-finite check — as ``fastdit train`` runs it; its rate is
  the trainer's own images/s over the timed logging intervals.

Reported per variant: ms/step, images/s, achieved TFLOP/s and MFU (training FLOPs from the model's FLOP
counter; 712 GFLOP per DiT-XL/2 image is the baseline's figure, also given), peak memory. JSON and a
markdown table go to ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stock_models import StockDiT, StockJointStack  # noqa: E402

from fastdit.models import DiT  # noqa: E402
from fastdit.modules import JointDiTBlock  # noqa: E402
from fastdit.modules.blocks import add_pending  # noqa: E402
from fastdit.ops.rotary import rope_freqs_1d, rope_freqs_2d  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, SXM: the MFU denominator the baseline used


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, make_batch: Callable, device, steps: int, warmup: int, profile_to: str = "",
               forward_only: bool = False) -> float:
    """Seconds per step of the baseline's training step on ``model`` (``forward_only``: one inference
    forward under ``no_grad``); with ``profile_to``, two more steps run under the PyTorch profiler and a
    table of GPU time by kernel is written there."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = None if forward_only else torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)

    @torch.no_grad()
    def forward():
        args, _ = make_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(*args)

    def train_step():
        args, target = make_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(*args)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = forward if forward_only else train_step
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    if profile_to:
        write_profile(step, device, profile_to)
    return seconds


KERNEL_KINDS = (("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
                ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "_attn")),
                ("triton", ("triton",)), ("optimizer", ("adam", "multi_tensor", "foreach")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def write_profile(step: Callable, device, path: str, steps: int = 2) -> None:
    """GPU time per kernel over ``steps`` steps (sorted, with its kind) and totals by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows = [(e.key, e.device_time_total / steps / 1e3, e.count // steps, kernel_kind(e.key))
            for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    rows.sort(key=lambda r: -r[1])
    kinds: Dict[str, float] = {}
    for _, ms, _, kind in rows:
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = ["GPU ms per step by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
             + f" (sum {sum(kinds.values()):.1f})", "", "ms/step  calls/step  kind       kernel"]
    lines += [f"{ms:8.3f}  {n:10d}  {kind:9s}  {name[:150]}" for name, ms, n, kind in rows[:60]]
    cpu = sorted((e for e in prof.key_averages() if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    lines += ["", "host: ms/step of self CPU time, calls/step, op"]
    lines += [f"{e.self_cpu_time_total / steps / 1e3:8.3f}  {e.count // steps:10d}  {e.key[:150]}" for e in cpu[:40]]
    Path(path).write_text("\n".join(lines) + "\n")


def compiled(model, how: str):
    if how == "model":
        return torch.compile(model)
    if how == "max-autotune":
        return torch.compile(model, mode="max-autotune-no-cudagraphs")
    if how == "blocks":
        for block in model.blocks:
            block.compile(fullgraph=True)
    return model


# ---- DiT-XL/2 ------------------------------------------------------------------------------------------
class TokenDiT(torch.nn.Module):
    """fastdit's DiT returning what the stock model returns (patch tokens (B, N, p·p·C)), so both compare
    with the same loss; ``blocks`` is the DiT's, for per-block compile."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit
        self.blocks = dit.blocks

    def forward(self, x, t, y):
        out = self.dit(x, t, y)  # (B, C, H, W)
        B, C, H, W = out.shape
        p = self.dit.config.patch_size
        return out.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)


def dit_variants(args, device) -> List[Dict]:
    B = args.batch or (8 if args.tiny else 64 if args.forward_only else 128)
    size = dict(depth=2, hidden_size=128, num_heads=2) if args.tiny else {}
    latent = 8 if args.tiny else 32
    dit_flops = DiT.from_name("DiT-XL/2", learn_sigma=False, input_size=latent, **size).flops_per_sample(
        training=not args.forward_only)

    def make_batch():
        x = torch.randn(B, 4, latent, latent, device=device)
        return (x, torch.rand(B, device=device) * 1000, torch.randint(0, 1000, (B,), device=device)), \
            torch.randn(B, (latent // 2) ** 2, 16, device=device)

    def stock(how):
        s = dict(depth=2, dim=128, heads=2, latent=latent) if args.tiny else {}
        return compiled(StockDiT(**s).to(device), how)

    def ours(backend, how, fp8=None):
        dit = DiT.from_name("DiT-XL/2", backend=backend, learn_sigma=False, input_size=latent, **size)
        if fp8:  # FP8 mode (issue 16): switched before compile, as the trainer does
            from fastdit.modules.fp8 import enable_fp8
            enable_fp8(dit, fp8)
        return compiled(TokenDiT(dit).to(device), how)

    def torchao_fp8(recipe, how):
        """The stock model with torchao's float8 training on its blocks' Linear layers (the alternative a user
        would reach for), compiled as ``how``."""
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        model = StockDiT(**(dict(depth=2, dim=128, heads=2, latent=latent) if args.tiny else {})).to(device)
        convert_to_float8_training(model.blocks, config=Float8LinearConfig.from_recipe_name(recipe))
        return compiled(model, how)

    runs = [("stock-eager", lambda: stock("none")), ("stock-compile", lambda: stock("model"))]
    if args.max_autotune:
        runs.append(("stock-max-autotune", lambda: stock("max-autotune")))
    for backend in args.backends:
        for how in args.compile:
            runs.append((f"fastdit-{backend}-{how}", lambda b=backend, h=how: ours(b, h)))
            for recipe in args.fp8:
                runs.append((f"fastdit-{backend}-{how}-fp8-{recipe}", lambda b=backend, h=how, r=recipe: ours(b, h, r)))
    for recipe in args.torchao:
        runs.append((f"stock-torchao-{recipe}", lambda r=recipe: torchao_fp8(r, "model")))
    results = args.results
    for name, build in runs:
        if args.only and name not in args.only:
            continue
        results.append(measure(name, build, make_batch, device, args, B, dit_flops))
    if not args.forward_only and (not args.only or "fastdit-trainer" in args.only):
        results.append(trainer_run(args, device, B, latent, size))
    return results


def trainer_run(args, device, B, latent, size) -> Dict:
    """``Trainer.fit`` as ``fastdit train`` runs it; rates from its own metrics records."""
    from fastdit.training import TrainConfig, Trainer
    from fastdit.training.build import build
    from fastdit.training.metrics import read_jsonl

    every = max(2, args.steps // 3)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig()
        config.run.output_dir = out
        config.run.max_steps = every * 4  # the first interval holds compilation and warm-up: dropped
        config.run.compile = device.type == "cuda"
        config.run.device = device.type
        config.model.name = "DiT-XL/2"
        config.model.options = {"learn_sigma": False, **size}
        config.data.batch_size = B
        config.data.latent_shape = (4, latent, latent)
        config.checkpoint.save_final = False
        config.checkpoint.every = 0
        config.logging.every = every
        config.logging.tensorboard = False
        config.logging.progress_bar = False
        built = build(config, rank=0, world_size=1)
        trainer = Trainer(config, built.model, built.task, built.dataset)
        try:
            trainer.fit()
        finally:
            trainer.close()
        records = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "images_per_s" in r]
    timed = records[1:]
    img_s = sum(r["images_per_s"] for r in timed) / len(timed)
    flops = built.task.flops_per_sample
    row = {"variant": "fastdit-trainer", "ms_per_step": 1e3 * B / img_s, "images_per_s": img_s,
           "steps_timed": every * len(timed),
           "tflops": img_s * flops / 1e12, "flops_per_image": flops,
           "peak_mem_GB": max(r.get("peak_mem_gb", 0) for r in records) * 2**30 / 1e9 if device.type == "cuda" else None,
           "loss_last": timed[-1]["loss"]}
    print(_line(row), flush=True)
    return row


# ---- Flux-style double blocks ---------------------------------------------------------------------------
class FastditJointStack(torch.nn.Module):
    """fastdit's JointDiTBlock × depth and a linear head: the stock stack's computation with fastdit's
    modules (RoPE tables for image (2-D) and caption (1-D) tokens instead of per-token cos/sin)."""

    def __init__(self, depth, dim, heads, backend, out_features=64):
        super().__init__()
        self.blocks = torch.nn.ModuleList(JointDiTBlock(dim, heads, qk_norm=True, backend=backend)
                                          for _ in range(depth))
        self.out = torch.nn.Linear(dim, out_features)

    def forward(self, x, c, t, img_freqs, txt_freqs):
        pending = None  # the residual carry, as MMDiT.forward
        for block in self.blocks:
            x, c, pending = block(x, c, t, None, img_freqs, txt_freqs, pending, True)
        return self.out(add_pending(x, pending[0]))


def mmdit_variants(args, device) -> List[Dict]:
    B = args.batch or 1
    depth, D, H, grid, Nc = (2, 256, 2, 8, 16) if args.tiny else (8, 3072, 24, 64, 512)
    Nx, d = grid * grid, D // H
    # matmul FLOPs of one image's forward (2 per multiply-add), ×3 for training; attention included.
    per_token = 2 * (3 * D * D + D * D + 8 * D * D)
    fwd = depth * (per_token * (Nx + Nc) + 4 * H * (Nx + Nc) ** 2 * d) + 2 * D * 64 * Nx
    flops = 3 * fwd
    angles = torch.randn(Nx + Nc, d, device=device)
    cos, sin = angles.cos(), angles.sin()
    img_freqs, txt_freqs = rope_freqs_2d(grid, grid, d, device=device), rope_freqs_1d(Nc, d, device=device)

    def batch_stock():
        return ((torch.randn(B, Nx, D, device=device), torch.randn(B, Nc, D, device=device),
                 torch.randn(B, D, device=device), cos, sin), torch.randn(B, Nx, 64, device=device))

    def batch_ours():
        (x, c, t, _, _), target = batch_stock()
        return (x, c, t, img_freqs, txt_freqs), target

    results = args.results
    for how in ("none", "model") + (("max-autotune",) if args.max_autotune else ()):
        name = "stock-" + {"none": "eager", "model": "compile"}.get(how, how)
        if not args.only or name in args.only:
            results.append(measure(name, lambda h=how: compiled(StockJointStack(depth, D, H).to(device), h),
                                   batch_stock, device, args, B, flops))
    for backend in args.backends:
        for how in args.compile:
            name = f"fastdit-{backend}-{how}"
            if not args.only or name in args.only:
                results.append(measure(name, lambda b=backend, h=how: compiled(
                    FastditJointStack(depth, D, H, b).to(device), h), batch_ours, device, args, B, flops))
    return results


# ---- common --------------------------------------------------------------------------------------------
def measure(name, build, make_batch, device, args, B, flops_per_image) -> Dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = None
    try:
        model = build()  # inside: a variant whose build fails (a missing library) is recorded, not fatal
        profile_to = os.path.join(args.out, f"profile_{args.slug}_{name}.txt") if (args.profile and args.out) else ""
        seconds = time_steps(model, make_batch, device, args.steps, args.warmup, profile_to, args.forward_only)
        row = {"variant": name, "ms_per_step": 1e3 * seconds, "images_per_s": B / seconds,
               "tflops": B * flops_per_image / seconds / 1e12, "flops_per_image": flops_per_image,
               "peak_mem_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    except Exception as err:  # record why a variant could not run instead of losing the others
        row = {"variant": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(_line(row), flush=True)
    return row


def _line(row: Dict) -> str:
    if "error" in row:
        return f"{row['variant']:28s} ERROR {row['error']}"
    mem = "" if row.get("peak_mem_GB") is None else f" peak {row['peak_mem_GB']:.1f} GB"
    mfu = row["tflops"] / H100_BF16_PEAK_TFLOPS
    return (f"{row['variant']:28s} {row['ms_per_step']:9.2f} ms/step {row['images_per_s']:9.1f} img/s "
            f"{row['tflops']:7.1f} TFLOP/s (MFU {100 * mfu:.1f}% of {H100_BF16_PEAK_TFLOPS:.0f}){mem}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("dit", "dit-forward", "mmdit"))
    parser.add_argument("--max-autotune", action="store_true",
                        help="also the stock model under torch.compile(mode='max-autotune-no-cudagraphs')")
    parser.add_argument("--out", default=None, help="folder for train_step_<model>.json / .md")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (dit 12, mmdit 6: the baseline's)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=["auto", "reference"])
    parser.add_argument("--compile", nargs="+", default=["blocks"], choices=("none", "blocks", "model"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("--fp8", nargs="*", default=[], metavar="RECIPE",
                        help="also fastdit's FP8 mode with these recipes (rowwise, rowwise_hp_wgrad, tensorwise), "
                             "for each backend and compile mode (dit only)")
    parser.add_argument("--torchao", nargs="*", default=[], metavar="RECIPE",
                        help="also the stock model with torchao float8 training (recipes: rowwise, tensorwise), "
                             "compiled whole (dit only)")
    parser.add_argument("--attention-path", choices=("kernel", "prepass", "sdpa"), default=None,
                        help="force fastdit's attention path under backend auto (default: its own choice)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--profile", action="store_true", help="also write a GPU-time-by-kernel table per variant")
    parser.add_argument("--tiny", action="store_true", help="small model on whatever device: a smoke run")
    args = parser.parse_args(argv)
    args.forward_only = args.model == "dit-forward"
    args.steps = args.steps or (6 if args.model == "mmdit" else 12)
    args.slug = args.model.replace("-", "_") + args.tag  # names this run's JSON and profiles
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.attention_path:
        from fastdit.ops.attention import set_attention_path
        set_attention_path(args.attention_path)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if device.type != "cuda" and not args.tiny:
        parser.error("the full-size runs need a GPU (use --tiny for a CPU smoke run)")
    record = {"benchmark": f"train_step.{args.model}", "tiny": args.tiny, "attention_path": args.attention_path,
              "steps": args.steps, "warmup": args.warmup, "complete": False}
    if device.type == "cuda":
        from fastdit.bench.timing import environment
        record = {**environment(), **record}

    if args.out:  # before the first variant: profiles are written as each one finishes
        Path(args.out).mkdir(parents=True, exist_ok=True)

    def write(rows) -> None:
        if args.out:
            Path(args.out, f"train_step_{args.slug}.json").write_text(
                json.dumps({**record, "results": list(rows)}, indent=1) + "\n")

    args.results = SavedResults(write)
    (mmdit_variants if args.model == "mmdit" else dit_variants)(args, device)
    record["complete"] = True
    write(args.results)
    return 0


class SavedResults(list):
    """The variants' rows, written out (``write(rows)``) as each one finishes: a run cut short by a time limit
    keeps what it measured; the JSON's ``complete`` turns true at the end."""

    def __init__(self, write: Callable[[List[Dict]], None]):
        super().__init__()
        self._write = write

    def append(self, row: Dict) -> None:
        super().append(row)
        self._write(self)


if __name__ == "__main__":
    sys.exit(main())

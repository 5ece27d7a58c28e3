"""diffusers transformers with and without fastdit's patch: one training step, one process, same GPU.

    python benchmarks/diffusers_step.py --out DIR                 # Flux-width and SD3-medium, 1024 px, bs 1
    python benchmarks/diffusers_step.py --models flux --double 4 --single 8
    python benchmarks/diffusers_step.py --tiny                    # CPU smoke run of the same code

Models are built from their configs with random weights (nothing is downloaded):

- ``flux``: ``FluxTransformer2DModel`` at Flux's width (3072, 24 heads of 128, T5 width 4096, CLIP pooled 768)
  with ``--double`` double-stream and ``--single`` single-stream blocks (Flux.1 has 19 + 38; fewer fit a
  full fine-tune step with fp32 AdamW states in 80 GB), 1024 px (4,096 image tokens) + 512 caption tokens;
- ``sd3``: ``SD3Transformer2DModel`` with SD3-medium's config (24 layers, 1536 wide, 24 heads of 64),
  1024 px (4,096 tokens) + 333 caption tokens (77 CLIP + 256 T5).

The step: bf16 autocast forward, MSE on float32 outputs against a random target, backward, fused AdamW
(fp32 master weights), ``set_to_none``. Variants, each in the same process: ``stock-eager``,
``stock-compile``, ``fastdit-eager``, ``fastdit-compile`` (``apply_fastdit(model, "auto")``); compile is
regional (each transformer block through ``torch.compile``, as diffusers' ``compile_repeated_blocks``
does); ``lora-*``: a peft LoRA adapter (rank 16 on to_q/to_k/to_v/to_out.0; the base frozen) trained with
the same step. Before a compiled fastdit run, one eager forward lets ``auto`` measure its attention paths
(as ``fastdit train`` does). Reported: ms/step (median over timed steps), peak memory, speed-up over the
stock peer with the same compile setting.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_flux(args, device):
    from diffusers import FluxTransformer2DModel
    if args.tiny:
        cfg = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 28, 28))
        h = w = 8
        L = 16
    else:
        cfg = dict(in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   axes_dims_rope=(16, 56, 56))
        h = w = 64  # 1024 px: 128×128 latents packed 2×2
        L = 512
    model = FluxTransformer2DModel(**cfg).to(device)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"),
                      -1).reshape(-1, 3).to(device)

    def batch():
        inputs = dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], device=device),
                      encoder_hidden_states=torch.randn(1, L, cfg["joint_attention_dim"], device=device),
                      pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=device),
                      timestep=torch.rand(1, device=device), img_ids=ids, txt_ids=torch.zeros(L, 3, device=device))
        return inputs, torch.randn(1, h * w, cfg["in_channels"], device=device)

    return model, batch, ["transformer_blocks", "single_transformer_blocks"], {**cfg, "image_tokens": h * w,
                                                                               "caption_tokens": L}


def build_sd3(args, device):
    from diffusers import SD3Transformer2DModel
    if args.tiny:
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                   pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
        size, L = 16, 16
    else:  # stabilityai/stable-diffusion-3-medium's transformer config
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        size, L = 128, 333
    model = SD3Transformer2DModel(**cfg).to(device)

    def batch():
        inputs = dict(hidden_states=torch.randn(1, cfg["in_channels"], size, size, device=device),
                      encoder_hidden_states=torch.randn(1, L, cfg["joint_attention_dim"], device=device),
                      pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=device),
                      timestep=torch.rand(1, device=device) * 1000)
        return inputs, torch.randn(1, cfg["out_channels"], size, size, device=device)

    tokens = (size // cfg["patch_size"]) ** 2
    return model, batch, ["transformer_blocks"], {**cfg, "image_tokens": tokens, "caption_tokens": L}


BUILDERS = {"flux": build_flux, "sd3": build_sd3}


def time_steps(model, batch: Callable, device, steps: int, warmup: int, profile_to: str = "") -> List[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))

    def step():
        inputs, target = batch()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**inputs, return_dict=False)[0]
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if profile_to:
        from train_step import write_profile
        write_profile(step, device, profile_to)
    return times


def variant(name: str, model_name: str, args, device, out_dir: Path, config: Dict) -> Dict:
    """One variant's row; ``config`` receives the model's config and token counts."""
    from fastdit.integrations.diffusers import apply_fastdit
    lora, patched, compile_ = name.startswith("lora-"), "fastdit" in name, name.endswith("compile")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row: Dict = {"variant": name}
    model = batch = None
    try:
        model, batch, block_lists, cfg = BUILDERS[model_name](args, device)
        config.update(cfg)
        model.train()
        if lora:
            from peft import LoraConfig
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights="gaussian"))
        if patched:
            report = apply_fastdit(model, backend=args.backend, warn=False)
            row["patched"] = report.patched
            row["left_stock"] = len(report.left_stock)
            inputs, _ = batch()  # one eager forward: auto measures its attention paths at these shapes
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                model(**inputs, return_dict=False)
        if compile_:
            for attr in block_lists:
                for block in getattr(model, attr):
                    block.compile()
        start = time.perf_counter()
        profile_to = str(out_dir / f"profile_{model_name}_{name}.txt") if args.profile and out_dir else ""
        times = time_steps(model, batch, device, args.steps, args.warmup, profile_to)
        row.update(ms_per_step=1e3 * statistics.median(times), ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                   wall_s=time.perf_counter() - start,
                   peak_mem_GB=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   params=sum(p.numel() for p in model.parameters()))
    except Exception as err:  # one failing variant must not lose the others
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        import traceback
        traceback.print_exc()
    finally:
        model = batch = None
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda" and "error" not in row:  # after a CUDA error the context is unusable
            torch.cuda.empty_cache()
    print(_line(model_name, row), flush=True)
    return row


def isolated_variant(name: str, model_name: str, args, config: Dict) -> Dict:
    """:func:`variant` in a child process: a CUDA error (which poisons the process's context) or a hang in one
    variant loses that row only, and no variant inherits another's compiled code or allocator state."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--models", model_name, "--variants", name, "--row-out", str(row_file),
               "--double", str(args.double), "--single", str(args.single), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--backend", args.backend] + (["--profile"] if args.profile else []) + (
               ["--out", args.out] if args.out else []) + (["--tiny"] if args.tiny else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
            tail = (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as err:
            tail, proc = f"timed out after {err.timeout:.0f} s", None
        if proc is not None and proc.returncode == 0 and row_file.exists():
            result = json.loads(row_file.read_text())
            config.update(result["config"])
            row = result["row"]
        else:
            row = {"variant": name, "error": f"child process failed ({'rc ' + str(proc.returncode) if proc else 'timeout'})"
                                             f": {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                   "log_tail": tail}
    print(_line(model_name, row), flush=True)
    return row


def _line(model_name: str, row: Dict) -> str:
    if "error" in row:
        return f"{model_name:5s} {row['variant']:22s} ERROR {row['error']}"
    mem = "" if row.get("peak_mem_GB") is None else f" peak {row['peak_mem_GB']:.1f} GB"
    return (f"{model_name:5s} {row['variant']:22s} {row['ms_per_step']:9.2f} ms/step "
            f"(min {row['ms_min']:.2f}, max {row['ms_max']:.2f}){mem}")


def speedups(rows: List[Dict]) -> None:
    """Each fastdit row gets ``speedup`` over the stock row with the same compile setting and LoRA."""
    by_name = {r["variant"]: r for r in rows if "ms_per_step" in r}
    for r in rows:
        if "fastdit" in r["variant"] and r["variant"] in by_name:
            peer = by_name.get(r["variant"].replace("fastdit", "stock"))
            if peer:
                r["speedup_vs_stock"] = peer["ms_per_step"] / r["ms_per_step"]
                r["memory_vs_stock"] = (r["peak_mem_GB"] / peer["peak_mem_GB"]) if peer.get("peak_mem_GB") else None


def markdown(record: Dict) -> str:
    lines = [f"# diffusers training step, stock vs `apply_fastdit` — {record.get('gpu', 'CPU (smoke run)')}", "",
             f"torch {torch.__version__}, diffusers {record['diffusers']}, fastdit commit {record.get('git_commit')}, "
             f"{record.get('date', '')}; bf16 autocast, fused AdamW, bs 1, median of {record['steps']} steps "
             f"after {record['warmup']} warm-up.", ""]
    for model_name, entry in record["models"].items():
        cfg = entry["config"]
        lines += [f"## {model_name}: {cfg.get('image_tokens')} image + {cfg.get('caption_tokens')} caption tokens",
                  "", "| variant | ms/step | speed-up vs stock | peak GB | memory vs stock |", "| --- | --- | --- | --- | --- |"]
        for r in entry["results"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error'][:120]} | | | |")
                continue
            sp = f"{r['speedup_vs_stock']:.3f}×" if "speedup_vs_stock" in r else ""
            mem = f"{r['peak_mem_GB']:.1f}" if r.get("peak_mem_GB") is not None else ""
            mv = f"{r['memory_vs_stock']:.3f}×" if r.get("memory_vs_stock") else ""
            lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} | {sp} | {mem} | {mv} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["flux", "sd3"], choices=sorted(BUILDERS))
    parser.add_argument("--variants", nargs="+", default=["stock-eager", "fastdit-eager", "stock-compile",
                                                          "fastdit-compile", "lora-stock-compile",
                                                          "lora-fastdit-compile"])
    parser.add_argument("--double", type=int, default=4, help="Flux double-stream blocks")
    parser.add_argument("--single", type=int, default=8, help="Flux single-stream blocks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel per variant")
    parser.add_argument("--tiny", action="store_true", help="tiny models on whatever device: a smoke run")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="apply_fastdit's backend for the fastdit variants")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each variant in its own process (default: on a GPU)")
    parser.add_argument("--variant-timeout", type=float, default=900, help="seconds per isolated variant")
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)  # a child's result file
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("the full-size runs need a GPU (use --tiny for a CPU smoke run)")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    import diffusers
    record: Dict = {"benchmark": "diffusers_step", "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup, "backend": args.backend,
                    "diffusers": diffusers.__version__, "models": {}}
    if device.type == "cuda":
        from fastdit.bench.timing import environment
        record = {**environment(), **record}
        record["timer"] = "wall time per step, device synchronised at both ends; median of the timed steps"
    if args.row_out:  # a child of isolated_variant: one model, one variant
        config = {}
        row = variant(args.variants[0], args.models[0], args, device, out_dir, config)
        Path(args.row_out).write_text(json.dumps({"row": row, "config": config}))
        return 0
    isolate = device.type == "cuda" if args.isolate is None else args.isolate
    for model_name in args.models:
        config: Dict = {}
        rows = [isolated_variant(v, model_name, args, config) if isolate else
                variant(v, model_name, args, device, out_dir, config) for v in args.variants]
        speedups(rows)
        record["models"][model_name] = {"config": config, "results": rows}
        if out_dir:  # written after each model: a later failure keeps what ran
            (out_dir / "diffusers_step.json").write_text(json.dumps(record, indent=1) + "\n")
            (out_dir / "diffusers_step.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

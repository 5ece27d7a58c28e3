"""The ``fastdit`` command: thin entry points that parse arguments and call the library.

    fastdit info     versions, device, and which implementation each op takes here
    fastdit demo     placeholder main job: a small DiT-block stack trained for a few steps
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

import fastdit
from fastdit.backend import BACKENDS, get_backend, use_backend


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"fastdit: --device {name} asked for, but CUDA is not available here")
    return torch.device(name)


def op_paths(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Which implementation each op takes under the current default backend, for typical inputs."""
    from fastdit.ops import adaln, attention, gated_adaln, qk_norm_rotary, rmsnorm, rotary
    from fastdit.ops._common import use_triton

    B, N, D, H, d = 2, 16, 128, 2, 64
    x = torch.zeros(B, N, D, device=device, dtype=dtype)
    m = torch.zeros(B, D, device=device, dtype=torch.float32)
    q = torch.zeros(B, N, H, d, device=device, dtype=dtype)
    w = torch.zeros(d, device=device, dtype=torch.float32)
    freqs = torch.zeros(N, d // 2, 2, device=device)
    cases = {
        "adaln_modulate": (adaln, lambda: adaln.triton_unsupported_reason(x, m, m)),
        "gated_residual_adaln": (gated_adaln, lambda: gated_adaln.triton_unsupported_reason(x, x, m, m, m)),
        "rms_norm": (rmsnorm, lambda: rmsnorm.triton_unsupported_reason(q, w)),
        "rope": (rotary, lambda: rotary.triton_unsupported_reason(q, freqs)),
        "qk_norm_rope": (qk_norm_rotary, lambda: qk_norm_rotary.triton_unsupported_reason(q, q, w, w, freqs)),
        "joint_attention": (attention, lambda: attention.triton_unsupported_reason(q)),
    }
    paths = {}
    for name, (module, reason) in cases.items():
        try:
            fast = use_triton(name, None, reason, module.KERNEL_READY and device.type == "cuda")
            paths[name] = "triton" if fast else ("sdpa (reference)" if name == "joint_attention" else "reference")
        except ValueError as err:
            paths[name] = f"error: {err}"
    return paths


def cmd_info(args: argparse.Namespace) -> int:
    device = _device(args.device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "fastdit": fastdit.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "default_backend": get_backend(),
        "op_paths (bf16 inputs)": op_paths(device),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Placeholder until the digits demo lands: trains a small stack of DiT blocks to denoise
    class-dependent token patterns, forward and backward through fastdit's modules."""
    from fastdit.modules import DiTBlock

    device = _device(args.device)
    torch.manual_seed(args.seed)
    dim, heads, tokens, classes = args.dim, args.heads, 16, 10
    blocks = torch.nn.ModuleList([DiTBlock(dim, heads) for _ in range(args.depth)]).to(device)
    label_embed = torch.nn.Embedding(classes, dim).to(device)
    head = torch.nn.Linear(dim, dim).to(device)
    params = list(blocks.parameters()) + list(label_embed.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    prototypes = torch.randn(classes, tokens, dim, device=device)  # what each class "looks like"
    print(f"fastdit demo (placeholder): {args.depth} DiT blocks, dim {dim}, {heads} heads, "
          f"device {device}, backend {args.backend or get_backend()}, paths {op_paths(device)}")
    losses: List[float] = []
    start = time.perf_counter()
    with use_backend(args.backend or get_backend()):
        for step in range(1, args.steps + 1):
            labels = torch.randint(0, classes, (args.batch,), device=device)
            clean = prototypes[labels]
            noisy = clean + torch.randn_like(clean)
            h, c = noisy, label_embed(labels)
            for block in blocks:
                h = block(h, c)
            loss = torch.nn.functional.mse_loss(head(h), clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"  step {step:4d}/{args.steps}  loss {loss.item():.4f}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"done: {args.steps} steps in {elapsed:.1f}s ({args.steps * args.batch / elapsed:.0f} samples/s); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        print("fastdit demo: the loss did not go down", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdit {fastdit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device and the path each op takes")
    info.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="placeholder main job: train a few DiT blocks for a few steps")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--batch", type=int, default=32)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--dim", type=int, default=128)
    demo.add_argument("--heads", type=int, default=2)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    demo.add_argument("--backend", choices=BACKENDS, default=None, help="default: FASTDIT_BACKEND or auto")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "depth", "dim", "heads"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise SystemExit(f"fastdit: --{name} must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

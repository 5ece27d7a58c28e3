"""The ``fastdit`` command: thin entry points that parse arguments and call the library.

    fastdit info     versions, device, and which implementation each op takes here
    fastdit demo     the main job: latent diffusion of scikit-learn's handwritten digits, with a report
    fastdit train    train a DiT / MMDiT from a TrainConfig (works under torchrun; fastdit train --help)
    fastdit sample   class-conditional sample grid (PNG + .npz) from a checkpoint (fastdit sample --help)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

import fastdit
from fastdit.backend import BACKENDS, get_backend, pick_device, use_backend


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
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise SystemExit(f"fastdit: --device: {err}") from None
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
    """The main job: latent diffusion of scikit-learn's handwritten digits (see fastdit.demos.digits)."""
    from fastdit.demos.digits import DigitsDemoConfig, run, summary_lines

    cfg = DigitsDemoConfig(out_dir=args.out, mode=args.mode, seed=args.seed, device=args.device,
                           cfg_scale=args.cfg_scale, progress=not args.no_progress)
    if args.quick:
        cfg = cfg.quick()
    for name in ("ae_steps", "dit_steps", "samples_per_class", "sample_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"fastdit demo: --{name.replace('_', '-')} must be at least 1")
            setattr(cfg, name, value)
    try:
        with use_backend(args.backend or get_backend()):
            report = run(cfg)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"fastdit demo: {err}") from None
    print("\n".join(summary_lines(report)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdit {fastdit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device and the path each op takes")
    info.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="main job: latent diffusion of the digits scikit-learn ships "
                                       "(AE + DiT, CFG samples, report)")
    demo.add_argument("--out", default="fastdit-demo", help="output folder (default fastdit-demo)")
    demo.add_argument("--mode", choices=("class", "captions"), default="class",
                      help="class: DiT on labels; captions: MMDiT on captions (needs fastdit[captions])")
    demo.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    demo.add_argument("--ae-steps", type=int, default=None, help="autoencoder training steps (default 800)")
    demo.add_argument("--dit-steps", type=int, default=None, help="denoiser training steps (default 2000)")
    demo.add_argument("--samples-per-class", type=int, default=None, help="default 20")
    demo.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default 40)")
    demo.add_argument("--quick", action="store_true", help="a few seconds' smoke run (figures mean little)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--backend", choices=BACKENDS, default=None, help="default: FASTDIT_BACKEND or auto")
    demo.set_defaults(func=cmd_demo)
    _add_entry_commands(sub)
    return parser


# `train` and `sample` own their arguments (fastdit.training.entry): main() hands them the rest of argv
# before this parser sees it; the subparsers here only list them in `fastdit --help`.
ENTRY_COMMANDS = {"train": "main_train", "sample": "main_sample"}


def _add_entry_commands(sub) -> None:
    helps = {"train": "train a DiT / MMDiT from a config (fastdit train --help)",
             "sample": "sample grid (PNG + .npz) from a checkpoint (fastdit sample --help)"}
    for name in ENTRY_COMMANDS:
        cmd = sub.add_parser(name, help=helps[name], add_help=False)
        cmd.add_argument("argv", nargs=argparse.REMAINDER)
        cmd.set_defaults(func=lambda args, _name=name: _run_entry(_name, args.argv))


def _run_entry(name: str, argv: List[str]) -> int:
    from fastdit.training import entry
    return getattr(entry, ENTRY_COMMANDS[name])(argv, prog=f"fastdit {name}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ENTRY_COMMANDS:
        return _run_entry(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

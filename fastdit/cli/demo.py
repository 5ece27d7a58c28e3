"""``fastdit demo``: the main job, latent diffusion of scikit-learn's digits (see :mod:`fastdit.demos.digits`)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from fastdit.backend import BACKENDS, get_backend, use_backend


def run(args: argparse.Namespace) -> int:
    """The main job: latent diffusion of scikit-learn's handwritten digits (see fastdit.demos.digits)."""
    from fastdit.demos.digits import DigitsDemoConfig, run as run_demo, summary_lines

    cfg = DigitsDemoConfig(out_dir=args.out, mode=args.mode, task=args.task, seed=args.seed, device=args.device,
                           cfg_scale=args.cfg_scale, progress=not args.no_progress, precision=args.precision)
    if args.quick:
        cfg = cfg.quick()
    if args.guidance_interval is not None:
        from fastdit.cli.sample import parse_guidance_interval

        try:
            cfg.guidance_interval = parse_guidance_interval(args.guidance_interval)
        except ValueError as err:
            raise SystemExit(f"fastdit demo: {err}") from None
    for name in ("ae_steps", "dit_steps", "samples_per_class", "sample_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"fastdit demo: --{name.replace('_', '-')} must be at least 1")
            setattr(cfg, name, value)
    try:
        cfg.check()
        with use_backend(args.backend or get_backend()):
            report = run_demo(cfg)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"fastdit demo: {err}") from None
    print("\n".join(summary_lines(report)))
    return 0


def parser(prog: str = "fastdit demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The main job: latent diffusion of the 1,797 digits "
                                "scikit-learn ships (autoencoder + DiT, guided samples, a report).")
    p.add_argument("--out", default="fastdit-demo", help="output folder (default fastdit-demo)")
    p.add_argument("--mode", choices=("class", "captions"), default="class",
                   help="class: DiT on labels; captions: MMDiT on captions (needs fastdit[captions])")
    p.add_argument("--task", choices=("rectified_flow", "ddpm"), default="rectified_flow",
                   help="the denoiser's objective: rectified_flow (default, Euler sampling) or ddpm (a DiT with "
                        "learned sigma, linear schedule, hybrid loss; DDPM sampling; class mode only)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1: none; 3 was the default before the FD / recall "
                        "figures showed it costs diversity)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only at normalised times in [LO, HI] (1 = noise; default: every step)")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder training steps (default 800)")
    p.add_argument("--dit-steps", type=int, default=None, help="denoiser training steps (default 2000)")
    p.add_argument("--samples-per-class", type=int, default=None, help="default 20")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="sampling steps (default: 40 Euler steps; 100 DDPM steps with --task ddpm)")
    p.add_argument("--quick", action="store_true", help="a few seconds' smoke run (figures mean little)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: FASTDIT_BACKEND or auto")
    p.add_argument("--precision", choices=("bf16", "fp32", "fp8"), default=None,
                   help="the denoiser's training precision (default: bf16 on CUDA, fp32 on the CPU); fp8 also "
                        "samples with FP8 GEMMs")
    return p


def main(argv: Optional[List[str]] = None, prog: str = "fastdit demo") -> int:
    return run(parser(prog).parse_args(argv))

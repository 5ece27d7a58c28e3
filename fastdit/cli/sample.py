"""``fastdit sample``: a guided sample grid (PNG) and the raw samples (.npz) from a run, by class id or by
caption prompt; a thin parser over :func:`fastdit.training.sampling.sample_checkpoint`."""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional, Sequence, Tuple


def parser(prog: str = "fastdit sample") -> argparse.ArgumentParser:
    from fastdit.diffusion import SAMPLERS

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw a guided sample grid (PNG, one row per class or prompt) and the raw samples (.npz) "
                    "from a fastdit run.",
        epilog="examples:\n"
               "  fastdit sample runs/dit-s                                  # newest valid checkpoint, EMA weights\n"
               "  fastdit sample runs/dit-s/checkpoints/step_000010000 --classes 1,7,9 --num-per-class 8\n"
               "  fastdit sample runs/dit-s --sampler heun --steps 25 --cfg-scale 1.5 --no-ema\n"
               "  fastdit sample runs/dit-s --num-per-class 64 --compile     # compiled steps, CUDA graphs on GPU\n"
               "  fastdit sample fastdit-demo                                # the demo's denoiser run\n"
               "  fastdit sample runs/mmdit --prompt 'a handwritten seven' --prompt 'the digit two'\n"
               "  fastdit sample runs/mmdit --prompts-file prompts.txt        # one prompt per line\n"
               "  fastdit sample runs/dit-s --set model.options.backend=reference\n"
               "The default output is <run>/samples/sample_step_<N>.png (+ .npz); an existing one is kept and the "
               "new grid gets a -2, -3, ... suffix. An explicit --output that exists needs --overwrite.")
    p.add_argument("checkpoint", help="a run folder (its newest valid checkpoint), a checkpoint folder, or a folder "
                                      "holding one run (the demo's output)")
    p.add_argument("--output", default=None, metavar="FILE.png", help="grid path; the .npz goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-ema", action="store_true", help="use the raw model weights, not the EMA")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: the run's task.options.sampling, else euler for rectified flow, ddim for ddpm")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the run's task.options.sampling, else 50)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance, 1 = off (default: the run's task.options.sampling, else 4)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only at normalised times in [LO, HI] (1 = noise)")
    p.add_argument("--classes", default=None, metavar="0,1,2",
                   help="class ids, one grid row each (default: 4 spread over the range)")
    p.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                   help="a caption prompt, one grid row (repeatable; MMDiT runs that name their caption encoder)")
    p.add_argument("--prompts-file", default=None, metavar="FILE.txt", help="prompts, one per non-empty line")
    p.add_argument("--num-per-class", type=int, default=None,
                   help="samples per class or prompt, the grid's columns (default: the run's "
                        "task.options.sampling per_class, else 4)")
    p.add_argument("--seed", type=int, default=0, help="sample i gets the same noise in any batch size")
    p.add_argument("--batch-size", type=int, default=64, help="samples per model batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--precision", choices=("bf16", "fp32", "fp8"), default=None,
                   help="model autocast (default: the run's on CUDA -- bf16 for an fp8 run --, fp32 on CPU); fp8: "
                        "the blocks' Linear layers as FP8 GEMMs, each weight quantised once")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override a setting of the run's stored config before building the model "
                        "(e.g. model.options.backend=reference, data.options.display_scale=2; repeatable)")
    p.add_argument("--compile", action="store_true",
                   help="run each sampling step through torch.compile (one graph for the guided step, one for the "
                        "unguided; static shapes; CUDA graphs on CUDA): the first batch of each size compiles "
                        "(one line on stderr says so), later steps and batches replay it. Samples match the "
                        "uncompiled ones to float tolerance, not bitwise")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def parse_ints(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def parse_guidance_interval(text: Optional[str]) -> Optional[Tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval must be LO,HI, got {text!r}") from None
    if not 0 <= lo <= hi <= 1 or math.isnan(lo + hi):
        raise ValueError(f"--guidance-interval needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def read_prompts(prompts: Optional[Sequence[str]], path: Optional[str]) -> Optional[List[str]]:
    """The prompts of --prompt and --prompts-file together (None when neither is given)."""
    if prompts is None and path is None:
        return None
    out = list(prompts or [])
    if path is not None:
        try:
            with open(path, "r", encoding="utf-8") as fh:
                out += [line.strip() for line in fh if line.strip()]
        except OSError as err:
            raise ValueError(f"--prompts-file: cannot read {path}: {err.strerror or err}") from None
    if not out:
        raise ValueError("no prompts: --prompt was empty and --prompts-file has no non-empty line")
    return out


def main(argv: Optional[Sequence[str]] = None, prog: str = "fastdit sample") -> int:
    from fastdit.training.sampling import sample_checkpoint

    p = parser(prog)
    args = p.parse_args(None if argv is None else list(argv))
    try:
        prompts = read_prompts(args.prompts, args.prompts_file)
        if prompts is not None and args.classes is not None:
            raise ValueError("give --classes or prompts, not both")
        result = sample_checkpoint(
            args.checkpoint, classes=parse_ints(args.classes, "--classes") if args.classes else None,
            prompts=prompts, num_per_class=args.num_per_class, sampler=args.sampler, steps=args.steps,
            cfg_scale=args.cfg_scale, guidance_interval=parse_guidance_interval(args.guidance_interval),
            seed=args.seed, batch_size=args.batch_size, device=args.device, precision=args.precision,
            use_ema=not args.no_ema, output=args.output, overwrite=args.overwrite, overrides=args.overrides,
            progress=args.progress, compile=args.compile,
            log=lambda m: print(f"{prog}: {m}", file=sys.stderr, flush=True))
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # ConfigError, CheckpointError: ValueError
        p.error(str(err))
    rows = "prompts" if prompts is not None else "classes"
    print(f"{prog}: {result.count} samples ({len(result.rows)} {rows} x {result.num_per_class}), {result.sampler} "
          f"{result.steps} steps, cfg {result.cfg_scale:g}, {result.weights} weights of step {result.step}, "
          f"{result.seconds:.1f}s -> {result.png}, {result.npz}", flush=True)
    return 0

"""fastdit scaling: a scaling-law study -- train a grid of DiT sizes x training budgets, fit held-out loss
and sample quality (FD) against training compute, write scaling.json and scaling.png (fastdit.scaling).
Prints the grid, FLOPs per point and an estimated wall time first; --dry-run stops there. Running again in
the same --out retrains nothing that is done."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fastdit.backend import BACKENDS, get_backend, use_backend

_EPILOG = """\
sizes: HxD (hidden size x depth, heads = H/32), HxDxN (N heads) or a DiT preset (DiT-S/2, DiT-B/2, ...);
append :lr=VALUE for a learning rate of that size's own, e.g. --sizes 64x3,256x8:lr=3e-4
budgets (--steps): optimizer steps; every (size, budget) is its own run with its own LR schedule.

data: by default the digits demo's latents (its autoencoder is trained once and cached in OUT/data); or
--config FILE.json [SECTION.KEY=VALUE ...] as for `fastdit train` (data, task, optim, precision; model.name
for HxD sizes, default DiT-S/2) with --held-out FILE (tensors 'x', 'y' like data.path) for the loss.

examples:
  fastdit scaling --dry-run                               # the default grid, its FLOPs and estimated time
  fastdit scaling --out runs/scaling                      # run it (~15 min on a 2-core CPU), resumable
  fastdit scaling --sizes 32x2,64x3,128x4 --steps 200,400,800 --threads 1
  fastdit scaling --config gpu.json --held-out val.pt --sizes DiT-S/2,DiT-B/2,DiT-L/2 --steps 2000,4000,8000
"""


def parser(prog: str = "fastdit scaling") -> argparse.ArgumentParser:
    from fastdit.scaling.spec import DEFAULT_BUDGETS, DEFAULT_SIZES

    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fastdit-scaling", help="output folder (default fastdit-scaling)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"model sizes, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--steps", default=DEFAULT_BUDGETS,
                   help=f"training budgets in steps, comma-separated (default {DEFAULT_BUDGETS})")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (digits) or the config's")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (digits) or the config's optim.lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1 -- tiny models gain little from more, and on a "
                        "busy machine several threads can be 10-100x slower)")
    p.add_argument("--config", metavar="FILE.json", default=None, help="a fastdit train config instead of digits")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override a --config setting (repeatable)")
    p.add_argument("--held-out", default=None, help="held-out latents for --config runs (.pt/.npz with 'x', 'y')")
    p.add_argument("--ae-steps", type=int, default=800, help="digits autoencoder steps (default 800, trained once)")
    p.add_argument("--fd-samples", type=int, default=None, help="samples for FD (default: all held-out digits)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps of the FD samples (default 20)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance of the FD samples (default 1.5)")
    p.add_argument("--no-fd", action="store_true", help="skip FD (held-out loss only)")
    p.add_argument("--eval-repeats", type=int, default=4, help="(noise, t) draws per held-out latent (default 4)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the fits' intervals")
    p.add_argument("--estimate-steps", type=int, default=2,
                   help="timed training steps per size for the wall-time estimate (0: no estimate)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (grid, FLOPs, estimate) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: FASTDIT_BACKEND or auto")
    p.add_argument("--precision", choices=("bf16", "fp32", "fp8"), default=None,
                   help="training precision of every point (default: the data's: digits bf16 on CUDA, fp32 on the "
                        "CPU; --config: its run.precision). fp8: the blocks' Linear layers as FP8 GEMMs -- run "
                        "the same grid in two folders to compare the loss of fp8 and bf16 point by point")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="save each point's trainer checkpoint every STEPS steps, so a point cut short resumes "
                        "from its latest one (each holds the model, EMA and optimizer state; default: digits "
                        "only the final one, --config its checkpoint.every)")
    return p


def _config(args: argparse.Namespace, p: argparse.ArgumentParser):
    from fastdit.scaling.spec import GridError, ScalingConfig, parse_budgets, parse_sizes
    from fastdit.training.config import ConfigError, TrainConfig

    try:
        base = None
        if args.config is not None:
            base = TrainConfig.from_json(args.config, args.overrides)
        elif args.overrides or args.held_out:
            p.error("--set and --held-out go with --config (the digits data need neither)")
        return ScalingConfig(out_dir=args.out, sizes=parse_sizes(args.sizes), budgets=parse_budgets(args.steps),
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                             threads=args.threads, base_config=base, held_out=args.held_out, ae_steps=args.ae_steps,
                             fd_samples=args.fd_samples, sample_steps=args.sample_steps, cfg_scale=args.cfg_scale,
                             fd=not args.no_fd, eval_repeats=args.eval_repeats, confidence=args.confidence,
                             progress=not args.no_progress, precision=args.precision,
                             checkpoint_every=args.checkpoint_every).check()
    except (GridError, ConfigError) as err:
        p.error(str(err))


def summary_lines(report) -> List[str]:
    """The console summary: each point's loss / FD, the fits with their intervals, and what was left out."""
    lines = [f"  {'point':<30}{'status':>9}{'train FLOPs':>13}{'loss':>9}{'FD':>9}{'wall s':>8}"]
    for r in report["points"]:
        fd, loss = r.get("fd"), r.get("held_out_loss")
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        fd_text = f"{fd:.3g}" if fd is not None else "-"
        wall = r.get("wall_seconds", r.get("train_seconds", 0.0))
        lines.append(f"  {r['key']:<30}{r['status']:>9}{r['train_flops']:>13.3e}{loss_text:>9}{fd_text:>9}{wall:>8.1f}")

    def fit_line(name, entry):
        fit = entry.get("fit")
        if not fit:
            return f"{name}: no fit ({entry.get('error')})"
        def num(v, spec=".3g"):
            return "-" if v is None else format(v, spec)

        def ci(k):
            return f" [{num(fit[k][0])}, {num(fit[k][1])}]" if fit.get(k) else ""

        return (f"{name}: L = a*C^-b + c on {fit['n']} points: b = {num(fit['b'], '.3f')}{ci('b_ci')}, "
                f"c = {num(fit['c'])}{ci('c_ci')}, a = {num(fit['a'])}{ci('a_ci')}, R^2(log) = {num(fit['r2'], '.3f')}"
                + (f" ({'; '.join(fit['notes'])})" if fit.get("notes") else ""))

    fits = report["fits"]
    lines.append(f"fits ({report['grid']['confidence']:.0%} intervals from the fit covariance, Student-t; "
                 f"R^2 of log L):")
    lines.append("  " + fit_line("loss frontier", fits["loss_frontier"]))
    for size, entry in fits["loss_per_size"].items():
        lines.append("  " + fit_line(f"loss {size}", entry))
    if "fd_frontier" in fits:
        lines.append("  " + fit_line("FD frontier", fits["fd_frontier"]))
        ref = report["grid"]["evaluation"].get("fd_real_reference") or {}
        if ref.get("fd") is not None:
            lines.append(f"  FD yardstick: {ref['what']}: FD {ref['fd']:.3g}, precision {ref['precision']:.2f}, "
                         f"recall {ref['recall']:.2f}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"wrote {report['files']['report']} and {report['files']['plot']} "
                 f"({len(report['trained_now'])} point(s) trained now, {report['seconds_this_invocation']:.0f} s)")
    return lines


def main(argv: Optional[List[str]] = None, prog: str = "fastdit scaling") -> int:
    from fastdit.scaling import GridError, Study
    from fastdit.training.config import ConfigError

    p = parser(prog)
    args = p.parse_args(argv)
    cfg = _config(args, p)
    if args.estimate_steps < 0:
        p.error("--estimate-steps must be >= 0")
    try:
        with use_backend(args.backend or get_backend()):
            # the plan first: made without training anything (the digits autoencoder comes after it)
            study = Study.prepare(cfg, train_data=False)
            estimate = study.estimate(args.estimate_steps)
            print("\n".join(study.plan_lines(estimate)), flush=True)
            if args.dry_run:
                return 0
            if study.evald is None:
                print(f"training the digits autoencoder ({cfg.ae_steps} steps, once; cached in {cfg.out_dir}/data)",
                      flush=True)
                study = Study.prepare(cfg)
            report = study.run()
    except (GridError, ConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    print("\n".join(summary_lines(report)), flush=True)
    return 0

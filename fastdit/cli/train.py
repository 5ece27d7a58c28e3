"""``fastdit train``: parse a :class:`~fastdit.training.TrainConfig` from a JSON file, shortcut flags and
``section.key=value`` overrides, build the run (:func:`fastdit.training.build.build`) and ``Trainer.fit()``.

Shortcut flags (``--output-dir``, ``--max-steps``, ``--resume``, ``--seed``, ``--precision``, ``--compile``)
apply after the file and before the overrides, so an explicit ``--set run.max_steps=...`` wins. Overrides
may be given with ``--set`` or bare, anywhere on the line (``--max-steps 10 optim.lr=1e-4``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import List, Optional, Sequence

from fastdit.training.config import ConfigError, TrainConfig

_SHORTCUTS = (("output_dir", "run.output_dir"), ("max_steps", "run.max_steps"), ("seed", "run.seed"),
              ("resume", "checkpoint.resume"), ("precision", "run.precision"), ("compile", "run.compile"))

_SECTIONS_HELP = """\
what the sections select (the rest are the trainer's own settings):
  model.name      a preset: {models}
  model.options   its fields, e.g. {{"depth": 12, "hidden_size": 384, "backend": "reference"}};
                  in_channels / input_size default to data.latent_shape, num_classes to data.num_classes
  task.name       rectified_flow (default) or ddpm; task.options: the objective's keyword arguments,
                  plus caption_dropout (MMDiT) and sampling {{"sampler", "steps", "cfg_scale", "per_class"}}
  data.kind       synthetic (random latents of data.latent_shape with data.num_classes labels) or memory
                  (data.path: a .pt/.npz with "x" (N,C,H,W) and "y" (N,), or "context"/"context_mask")
  data.options    display_scale, shuffle (memory), caption_len (synthetic MMDiT), autoencoder (a .pt of
                  fastdit.training.build.save_autoencoder) or vae (a local diffusers AutoencoderKL folder;
                  vae_allow_download=true to let it download), caption_encoder {{"path", "max_length"}}

every setting with its default (set any with --set SECTION.KEY=VALUE or bare SECTION.KEY=VALUE):
{settings}

resuming: a run whose output dir holds checkpoints resumes from the newest valid one (checkpoint.resume=auto);
its model, data.latent_shape, data.num_classes and task.name must match the checkpoint's, and optimizer
settings (optim.*, schedule.*) given now apply from the resumed step on.

examples:
  fastdit train --output-dir runs/dit-s --set model.name=DiT-S/2 --set data.latent_shape=4,32,32 --max-steps 1000
  fastdit train --config run.json --output-dir runs/exp1 optim.lr=1e-4 logging.sample_every=500
  torchrun --nproc-per-node 8 -m fastdit.cli train --config run.json --output-dir runs/big
"""


def settings_table(width: int = 110) -> str:
    """Every section's keys with their defaults, wrapped, for the help text."""
    lines = []
    for section in dataclasses.fields(TrainConfig):
        defaults = getattr(TrainConfig(), section.name)
        items = []
        for f in dataclasses.fields(defaults):
            value = getattr(defaults, f.name)
            shown = "(required)" if (section.name, f.name) == ("run", "output_dir") and not value else repr(value)
            items.append(f"{f.name}={shown}")
        line = f"  {section.name}:"
        for item in items:
            if len(line) + len(item) + 1 > width:
                lines.append(line)
                line = " " * (len(section.name) + 3)
            line += " " + item
        lines.append(line)
    return "\n".join(lines)


def parser(prog: str = "fastdit train") -> argparse.ArgumentParser:
    from fastdit.models import model_names

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DiT / MMDiT from a TrainConfig (JSON file + overrides); one process or under "
                    "torchrun (DDP/FSDP2).",
        epilog=_SECTIONS_HELP.format(models=", ".join(model_names()), settings=settings_table()))
    p.add_argument("--config", metavar="FILE.json", default=None,
                   help="TrainConfig as JSON (any subset of sections/keys; the rest default)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("overrides_positional", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="overrides may also be given bare, anywhere: optim.lr=1e-4 run.max_steps=1000")
    p.add_argument("--output-dir", default=None,
                   help="run folder (run.output_dir, required): checkpoints, samples, metrics.jsonl, config.json; "
                        "a folder with checkpoints is resumed")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for run.max_steps")
    p.add_argument("--seed", type=int, default=None, help="shortcut for run.seed")
    p.add_argument("--resume", default=None, help="shortcut for checkpoint.resume (auto | none | PATH)")
    p.add_argument("--precision", choices=("bf16", "fp32", "fp8"), default=None, help="shortcut for run.precision")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="shortcut for run.compile (torch.compile per block)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def overrides_from_args(args: argparse.Namespace) -> List[str]:
    """The override strings ``args`` implies, in the order they apply (shortcuts, then --set, then bare)."""
    out: List[str] = []
    for attr, key in _SHORTCUTS:
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    out += list(getattr(args, "overrides", None) or [])
    out += list(getattr(args, "overrides_positional", None) or [])
    return out


def config_from_args(args: argparse.Namespace, parser_: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """The validated ``TrainConfig`` of parsed arguments. A bad file, key or value becomes ``parser_.error``
    (exit status 2 with the message) when a parser is given, else ``ConfigError``."""
    try:
        return TrainConfig.from_json(getattr(args, "config", None), overrides_from_args(args))
    except ConfigError as err:
        if parser_ is not None:
            parser_.error(str(err))
        raise


def main(argv: Optional[Sequence[str]] = None, prog: str = "fastdit train") -> int:
    """Parse, build, ``Trainer.fit()``, print a one-line summary (rank 0), close."""
    from fastdit.training.build import build, task_name
    from fastdit.training.checkpoint import CheckpointError
    from fastdit.training.trainer import Trainer

    p = parser(prog)
    # intermixed: bare overrides may come after options (`--max-steps 10 optim.lr=1e-4`)
    args = p.parse_intermixed_args(None if argv is None else list(argv))
    config = config_from_args(args, p)
    if args.print_config:
        print(config.to_json())
        return 0
    if not config.run.output_dir:
        p.error("run.output_dir is required: pass --output-dir DIR (or --set run.output_dir=DIR); a folder that "
                "holds checkpoints is resumed, so give each experiment its own")
    try:
        built = build(config)
    except ConfigError as err:
        p.error(str(err))
    start = time.perf_counter()
    try:
        trainer = Trainer(config, built.model, built.task, built.dataset)
    except (ConfigError, CheckpointError) as err:
        p.error(str(err))
    try:
        summary = trainer.fit()
    except (ConfigError, CheckpointError, OSError) as err:
        # start-up checks, refused resumes, unreadable checkpoints, a full disk: one line, no traceback
        trainer.close()
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        trainer.close()
        raise
    try:
        if trainer.is_main:
            loss = summary["loss"]
            resumed = f", resumed from {summary['resumed_from']}" if summary["resumed_from"] else ""
            print(f"{prog}: {config.model.name} {task_name(config)}, step {summary['step']}/"
                  f"{config.run.max_steps}{resumed}, loss {'n/a' if loss is None else f'{loss:.4g}'}, "
                  f"skipped {summary['skipped_steps']}, {trainer.dist.world_size} rank(s) on {trainer.device}, "
                  f"{time.perf_counter() - start:.1f}s -> {config.run.output_dir}", flush=True)
    finally:
        trainer.close()
    return 0

"""Argument helpers for the ``fastdit train`` entry point (the command itself lives in fastdit/cli.py).

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args()
    config = config_from_args(args)          # JSON file + --set overrides + shortcuts, validated

Shortcut flags (``--output-dir``, ``--max-steps``, ``--resume``, ``--seed``, ``--precision``,
``--compile``) are applied after the file and before the ``--set`` overrides, so an explicit
``--set run.max_steps=...`` wins.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from fastdit.training.config import ConfigError, TrainConfig


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's options to ``parser`` (returns it)."""
    parser.add_argument("--config", metavar="FILE.json", default=None,
                        help="TrainConfig as JSON (any subset of sections/keys; the rest default)")
    parser.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("overrides_positional", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="overrides may also be given bare: optim.lr=1e-4 run.max_steps=1000")
    parser.add_argument("--output-dir", default=None, help="shortcut for run.output_dir")
    parser.add_argument("--max-steps", type=int, default=None, help="shortcut for run.max_steps")
    parser.add_argument("--seed", type=int, default=None, help="shortcut for run.seed")
    parser.add_argument("--resume", default=None, help="shortcut for checkpoint.resume (auto | none | PATH)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="shortcut for run.precision")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="shortcut for run.compile (torch.compile per block)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def overrides_from_args(args: argparse.Namespace) -> List[str]:
    """The override strings ``args`` implies, in the order they apply."""
    out: List[str] = []
    shortcuts = (("output_dir", "run.output_dir"), ("max_steps", "run.max_steps"), ("seed", "run.seed"),
                 ("resume", "checkpoint.resume"), ("precision", "run.precision"), ("compile", "run.compile"))
    for attr, key in shortcuts:
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    out += list(getattr(args, "overrides", None) or [])
    out += list(getattr(args, "overrides_positional", None) or [])
    return out


def config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """Build the validated ``TrainConfig`` from parsed arguments. A bad file, key or value becomes
    ``parser.error`` (exit status 2 with the message) when ``parser`` is given, else ``ConfigError``."""
    try:
        return build_config(getattr(args, "config", None), overrides_from_args(args))
    except ConfigError as err:
        if parser is not None:
            parser.error(str(err))
        raise


def build_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """``TrainConfig.from_json(path, overrides)``: the function the CLI calls."""
    return TrainConfig.from_json(path, overrides)

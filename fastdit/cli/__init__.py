"""The ``fastdit`` command: thin entry points that parse arguments and call the library.

    fastdit info     versions, device, and which implementation each op takes here
    fastdit demo     the main job: latent diffusion of scikit-learn's handwritten digits, with a report
    fastdit train    train a DiT / MMDiT from a TrainConfig (works under torchrun; fastdit train --help)
    fastdit sample   sample grid (PNG + .npz) by class or by caption prompt from a run (fastdit sample --help)
    fastdit scaling  scaling-law study: DiT sizes x training budgets, loss and FD against compute, fits
    fastdit prepare  encode images once into latent shards that training streams (fastdit prepare --help)
    fastdit bench    time every fastdit piece against every stock peer here, checked; JSON, tables, plots

Each command is a module of this package with ``parser(prog)`` and ``main(argv, prog)``; the library code
they call lives in :mod:`fastdit.training` (``build``, ``sampling``, the ``Trainer``), :mod:`fastdit.demos`
and :mod:`fastdit.scaling`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

import fastdit

# name -> (module, one-line help for `fastdit --help`)
COMMANDS = {
    "info": ("fastdit.cli.info", "versions, device and the path each op takes"),
    "demo": ("fastdit.cli.demo", "main job: latent diffusion of the digits scikit-learn ships (AE + DiT, CFG "
                                 "samples, report)"),
    "train": ("fastdit.cli.train", "train a DiT / MMDiT from a config (fastdit train --help)"),
    "sample": ("fastdit.cli.sample", "sample grid (PNG + .npz) by class or prompt from a run "
                                     "(fastdit sample --help)"),
    "scaling": ("fastdit.cli.scaling", "scaling-law study: DiT sizes x budgets, loss/FD vs compute (--help)"),
    "prepare": ("fastdit.cli.prepare", "encode images (tar shards or a folder) into latent shards (--help)"),
    "bench": ("fastdit.cli.bench", "time fastdit against every stock peer, checked; report + plots (--help)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and the list of commands (each command parses its own arguments)."""
    parser = argparse.ArgumentParser(prog="fastdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdit {fastdit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, add_help=False)
        cmd.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def run_command(name: str, argv: List[str]) -> int:
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv, prog=f"fastdit {name}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)  # --help, --version, or an error naming the valid commands
    return run_command(args.command, args.argv)


if __name__ == "__main__":
    sys.exit(main())

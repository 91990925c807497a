"""The `doublesparse` console command.

Each subcommand lives in its own module, named below, which defines `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`, and imports its heavy dependencies inside `run`
so that `doublesparse --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "run": "doublesparse.eval.commands.main_job",
    "eval": "doublesparse.eval.commands.evaluate",
    "bench": "doublesparse.eval.commands.bench",
    "calibrate": "doublesparse.calibration.command",
    "inspect": "doublesparse.calibration.inspect_command",
    "recall": "doublesparse.eval.commands.recall",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="doublesparse", description="Double Sparsity for Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ValueError as error:
        print(f"doublesparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

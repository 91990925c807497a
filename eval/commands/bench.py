"""`doublesparse bench`: speed benchmarks, one nested subcommand each.

A benchmark is a module with `HELP`, `add_arguments(parser)` and `run(args) -> int` that imports its
heavy dependencies inside `run`; add one with one line in `BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "speed benchmarks (kernels, calibration, decode, offload): time, bytes moved, bandwidth; JSON and plot"

BENCHMARKS = {
    "kernels": "doublesparse.eval.bench.kernels",
    "calibration": "doublesparse.eval.bench.calibration",
    "decode": "doublesparse.eval.bench.decode",
    "offload": "doublesparse.eval.bench.offload",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One nested subcommand per registered benchmark."""
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = benchmarks.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run_benchmark=module.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return int(args._run_benchmark(args) or 0)

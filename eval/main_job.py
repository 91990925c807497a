"""`doublesparse run`: the main job. Calibrate the bundled model, evaluate every method, write results.

With no arguments it works on the bundled model (a tiny random-weight model, labelled as such, when
the bundled model is not installed): calibrate (or load the shipped mask), then evaluate dense,
Double Sparsity and the baselines on perplexity and key-value retrieval at 1/4, 1/8 and 1/16 of the
context, print the table, and write results.json, results.csv and results.png under --out-dir.
"""

from __future__ import annotations

import argparse

HELP = "the main job: calibrate the bundled model, compare Double Sparsity with the baselines, save table and plot"

DEFAULT_METHODS = "dense,double_sparsity,oracle_topk,random_channels,streaming_llm,h2o,quest,sparq"
DEFAULT_SPARSITIES = "1/4,1/8,1/16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `doublesparse run`."""
    parser.add_argument("--out-dir", default="./doublesparse-run", help="folder for results.json, results.csv, results.png")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods to compare")
    parser.add_argument("--sparsity", default=DEFAULT_SPARSITIES, help="comma-separated token budgets (fractions)")
    parser.add_argument("--num-samples", type=int, default=None, help="retrieval prompts per setting (default: job's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the random-channel ablation")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight model even if the bundled one exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the main job; 0 on success."""
    from .main_job_impl import run_main_job

    return run_main_job(args)

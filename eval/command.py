"""`doublesparse eval`: compare methods on tasks at several sparsities; table on screen, JSON/CSV and a plot.

    doublesparse eval --model bundled --channels mask.safetensors --task kv_retrieval,perplexity \
        --method dense,double_sparsity,h2o --sparsity 1/4,1/8,1/16 --out results.json --plot results.png --csv

Every argument is checked (method and task names, sparsities, config knobs, the channel mask
against the model's config) before any weights are loaded.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

HELP = "evaluate Double Sparsity and baselines on perplexity, retrieval and lm-eval tasks at several sparsities"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `doublesparse eval`."""
    parser.add_argument("--model", default="bundled", help="local model folder, 'bundled' (default) or 'tiny-random'")
    parser.add_argument("--channels", default=None, help="channel mask file (doublesparse calibrate); 'calibrate' calibrates now on the bundled calibration text; default: the bundled model's shipped mask")
    parser.add_argument("--task", default="perplexity,kv_retrieval", help="comma-separated: perplexity, kv_retrieval, passkey, lm_eval:<task>")
    parser.add_argument("--method", default="dense,double_sparsity,oracle_topk,streaming_llm,h2o", help="comma-separated methods (see doublesparse.eval.methods)")
    parser.add_argument("--sparsity", default="1/4,1/8,1/16", help="comma-separated token budgets as fractions of the context, each in (0, 1]")
    parser.add_argument("--out", default="results.json", help="results JSON file")
    parser.add_argument("--plot", default=None, help="write a plot of metric against sparsity per method (PNG)")
    parser.add_argument("--csv", nargs="?", const="", default=None, help="also write CSV (to this path; default: the JSON path with .csv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and random-channel ablation")
    parser.add_argument("--num-samples", type=int, default=None, help="prompts (retrieval) or examples (lm-eval limit) per run")
    parser.add_argument("--context-length", type=int, default=1024, help="retrieval prompt length in tokens")
    parser.add_argument("--num-lines", type=int, default=None, help="kv_retrieval: number of lines instead of a context length")
    parser.add_argument("--text", default=None, help="perplexity text: a file, dataset:NAME[:CONFIG[:SPLIT]], or 'bundled' (default)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    parser.add_argument("--num-windows", type=int, default=8, help="perplexity windows")
    parser.add_argument("--num-channels", "-r", type=int, default=16, help="r: channels per head for double_sparsity, random_channels and sparq")
    parser.add_argument("--label-bits", type=int, default=16, choices=(16, 8, 4), help="double_sparsity label precision")
    parser.add_argument("--kind", default=None, choices=("q", "k", "qk"), help="double_sparsity channel statistic (default: the mask's own)")
    parser.add_argument("--sink-tokens", type=int, default=0, help="sink tokens every method keeps")
    parser.add_argument("--recent-tokens", type=int, default=0, help="recent tokens every method keeps")
    parser.add_argument("--selection", default="group", choices=("group", "head"), help="one selection per KV head or per query head")
    parser.add_argument("--page-size", type=int, default=16, help="quest page size")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


@dataclass
class EvalPlan:
    """A checked evaluation: model source, grid, where the channels come from, where outputs go."""

    source: Any
    spec: Any
    channels: Optional[str]  # a mask file, "calibrate", or None when no method needs one
    out_json: Optional[Path]
    out_csv: Optional[Path]
    out_plot: Optional[Path]


def method_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The registry options of method `name` taken from the command line."""
    if name == "double_sparsity":
        return {"kind": args.kind}
    if name == "random_channels":
        return {"seed": args.seed}
    if name == "quest":
        return {"page_size": args.page_size}
    return {}


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    """Check every argument and build the plan; ValueError saying what to change. Loads no weights."""
    from doublesparse.config import SparsityConfig

    from . import methods as method_registry
    from .model_source import resolve_model, shipped_mask_path, load_channel_mask, BUNDLED
    from .runner import GridSpec, parse_list, parse_sparsity
    from .tasks import check_task_name, make_task

    method_names = parse_list(args.method, "methods")
    for name in method_names:
        if name not in method_registry.METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; known methods are {', '.join(method_registry.METHOD_NAMES)}")
    task_names = parse_list(args.task, "tasks")
    for name in task_names:
        check_task_name(name)
    sparsities = sorted({parse_sparsity(s) for s in parse_list(args.sparsity, "sparsities")}, reverse=True)
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    base_config = SparsityConfig(
        num_channels=args.num_channels, token_budget=1.0, label_bits=args.label_bits, sink_tokens=args.sink_tokens,
        recent_tokens=args.recent_tokens, selection=args.selection,
    )
    built_methods = [method_registry.make_method(n, **method_options(n, args)) for n in method_names]
    options = dict(num_samples=args.num_samples, context_length=args.context_length, num_lines=args.num_lines,
                   text=args.text, window=args.window, num_windows=args.num_windows)
    tasks = [make_task(n, **options) for n in task_names]
    for task in tasks:
        check = getattr(task, "check_available", None)
        if check is not None:
            check()
    if args.text not in (None, "bundled") and not str(args.text).startswith("dataset:") and not Path(args.text).is_file():
        raise ValueError(f"--text {args.text!r} is not a file; pass a text file, dataset:NAME[:CONFIG[:SPLIT]] or bundled")

    source = resolve_model(args.model, seed=args.seed)
    layout = source.layout()
    base_config.check_model(layout.num_layers, layout.head_dim)
    channels = None
    if any(m.needs_channels for m in built_methods):
        channels = args.channels
        if channels is None and source.name == BUNDLED:
            shipped = shipped_mask_path()
            channels = str(shipped) if shipped else "calibrate"
        if channels is None:
            raise ValueError("double_sparsity needs a channel mask: pass --channels FILE (make one with `doublesparse calibrate`) or --channels calibrate")
        if channels == "calibrate" and not source.trained and source.name != "tiny-random":
            raise ValueError("--channels calibrate uses the bundled calibration text; pass a mask made for this model instead")
        if channels != "calibrate":
            load_channel_mask(channels, layout)

    out_json = Path(args.out) if args.out else None
    out_csv = None
    if args.csv is not None:
        if args.csv:
            out_csv = Path(args.csv)
        elif out_json is not None:
            out_csv = out_json.with_suffix(".csv")
        else:
            raise ValueError("--csv without a path needs --out to name the CSV after")
    out_plot = Path(args.plot) if args.plot else None
    spec = GridSpec(tasks=tasks, methods=built_methods, sparsities=sparsities, base_config=base_config, seed=args.seed)
    return EvalPlan(source, spec, channels, out_json, out_csv, out_plot)


def execute_plan(plan: EvalPlan, progress: bool = True, command: Optional[list[str]] = None, mask_out: Optional[Path] = None) -> dict[str, Any]:
    """Load the model, get the channels, run the grid, write the outputs; return the result document."""
    import torch

    from .model_source import calibrate_channels, load_channel_mask
    from .runner import evaluate_grid, format_table, plot_results, results_document, write_csv, write_json

    torch.manual_seed(plan.spec.seed)
    model, tokenizer = plan.source.load()
    mask, channels_info = None, {"source": None}
    if plan.channels == "calibrate":
        # A random-weight stand-in gains nothing from a long calibration.
        sizes = {"num_samples": 32, "seq_len": 512} if plan.source.trained else {"num_samples": 8, "seq_len": 256}
        mask, channels_info = calibrate_channels(model, tokenizer, seed=plan.spec.seed, progress=progress, **sizes)
        if mask_out is not None:
            mask.save(mask_out)
            channels_info["saved_to"] = str(mask_out)
    elif plan.channels is not None:
        mask = load_channel_mask(plan.channels, plan.source.layout())
        channels_info = {"source": plan.channels, "kind": mask.kind, "calibration": mask.calibration}
    rows = evaluate_grid(model, tokenizer, mask, plan.spec, progress=progress)
    document = results_document(rows, plan.spec, plan.source.info(), channels_info, command or sys.argv)
    if plan.out_json is not None:
        write_json(document, plan.out_json)
    if plan.out_csv is not None:
        write_csv(rows, plan.out_csv, plan.spec.seed, plan.source.name)
    if plan.out_plot is not None:
        plot_results(rows, plan.out_plot, f"{plan.source.description}, seed {plan.spec.seed}")
    document["table"] = format_table(rows)
    return document


def run(args: argparse.Namespace) -> int:
    """Run `doublesparse eval`; 0 on success."""
    plan = plan_from_args(args)
    document = execute_plan(plan, progress=not args.no_progress)
    if not plan.source.trained:
        print(f"NOTE: {plan.source.description}")
    print(document["table"])
    for path in (plan.out_json, plan.out_csv, plan.out_plot):
        if path is not None:
            print(f"wrote {path}")
    return 0

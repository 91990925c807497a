"""Body of the main job (kept apart so `doublesparse --help` imports nothing heavy)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Sizes that keep the whole job under five minutes on two CPU cores.
BUNDLED_SETTINGS = {"context_length": 1024, "num_samples": 20, "window": 512, "num_windows": 8}
TINY_SETTINGS = {"context_length": 256, "num_samples": 6, "window": 256, "num_windows": 4}


def job_arguments(args: argparse.Namespace, model: str, out_dir: Path) -> argparse.Namespace:
    """The `doublesparse eval` arguments the main job amounts to."""
    from .command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sizes = BUNDLED_SETTINGS if model == "bundled" else TINY_SETTINGS
    argv = [
        "--model", model, "--task", "perplexity,kv_retrieval", "--method", args.methods, "--sparsity", args.sparsity,
        "--seed", str(args.seed), "--out", str(out_dir / "results.json"), "--csv", str(out_dir / "results.csv"),
        "--plot", str(out_dir / "results.png"), "--context-length", str(sizes["context_length"]),
        "--num-samples", str(args.num_samples or sizes["num_samples"]), "--window", str(sizes["window"]),
        "--num-windows", str(sizes["num_windows"]),
    ]
    if model != "bundled":
        argv += ["--channels", "calibrate"]
    return parser.parse_args(argv)


def run_main_job(args: argparse.Namespace) -> int:
    """Calibrate (or load the shipped mask), evaluate every method, print the table, write the outputs."""
    from .command import execute_plan, plan_from_args
    from .model_source import bundled_model_present
    from .runner import format_markdown

    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    use_bundled = bundled_model_present() and not args.tiny
    model = "bundled" if use_bundled else "tiny-random"
    if not use_bundled:
        reason = "--tiny was given" if args.tiny else "the bundled trained model is not installed (doublesparse/assets/default_model has no weights)"
        print(f"NOTE: {reason}: running on a tiny model with RANDOM weights. The pipeline runs end to end, "
              "but the figures below say nothing about Double Sparsity.")
    eval_args = job_arguments(args, model, out_dir)
    plan = plan_from_args(eval_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_out = out_dir / "channels.safetensors" if plan.channels == "calibrate" else None
    command = ["doublesparse", "run"] + sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "run" else ["doublesparse", "run"]
    document = execute_plan(plan, progress=not args.no_progress, command=command, mask_out=mask_out)
    elapsed = time.perf_counter() - started
    print(f"model: {plan.source.description}")
    print(f"channels: {document['channels'].get('source')}")
    print(document["table"])
    (out_dir / "results.md").write_text(
        f"Model: {plan.source.description}\n\nCommand: `{' '.join(command)}`\n\n{format_markdown(document['results'])}\n", encoding="utf-8"
    )
    for name in ("results.json", "results.csv", "results.png", "results.md") + (("channels.safetensors",) if mask_out else ()):
        print(f"wrote {out_dir / name}")
    print(f"main job took {elapsed:.0f} s")
    return 0

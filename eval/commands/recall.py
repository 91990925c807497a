"""`doublesparse recall`: how well Double Sparsity-Offload predicts each layer's selection one layer early.

    doublesparse recall --model bundled --context-length 1024 --num-prompts 4 --steps 32 --out recall.json

With prefetching, the input of layer i predicts layer i+1's query, and layer i+1's tokens are selected
and copied before layer i+1 runs. This command runs key-value retrieval prompts through the model
patched with `SparsityConfig(offload=True, prefetch=True)` and an offload cache made with
`measure_recall=True`, so that every decode step of every predicted layer compares the predicted
selection with the exact one (recall = the share of the exact host rows the prediction also holds).
It prints, per layer, the mean recall over all prompts and steps and whether the default rule
(`prefetch_min_recall`) would make that layer select and copy synchronously; JSON with the settings,
provenance, per-layer and per-prompt figures goes to --out. Layer 0 is never predicted (nothing
precedes it) and always copies synchronously.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..harness.budgets import parse_budget

HELP = "measure per-layer recall of Double Sparsity-Offload's next-layer prefetch on retrieval prompts (table, JSON)"

TASKS = ("kv", "passkey")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `doublesparse recall`."""
    parser.add_argument(
        "--model",
        default="bundled",
        help="'bundled' (default), 'smollm2', 'tiny-random', a model folder, a .gguf file or a hub id",
    )
    parser.add_argument(
        "--channels",
        default=None,
        help="channel mask file (doublesparse calibrate), or 'calibrate' to calibrate now on the "
        "bundled calibration text; default: the bundled model's shipped mask, else calibrate now",
    )
    parser.add_argument(
        "--task", default="kv", choices=TASKS, help="retrieval prompts: key-value lines (default) or passkey"
    )
    parser.add_argument("--context-length", type=int, default=1024, help="prompt length in tokens (default: 1024)")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts (default: 4)")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps per prompt (default: 32)")
    parser.add_argument("--budget", default="1/16", help="token budget fraction (default: 1/16)")
    parser.add_argument("--num-channels", "-r", type=int, default=16, help="label channels r (default: 16)")
    parser.add_argument("--label-bits", type=int, default=16, choices=(16, 8, 4), help="label width (default: 16)")
    parser.add_argument("--sink-tokens", type=int, default=0, help="first tokens always kept (default: 0)")
    parser.add_argument("--recent-tokens", type=int, default=0, help="newest tokens always kept (default: 0)")
    parser.add_argument(
        "--selection", default="group", choices=("group", "head"), help="one selection per KV head or per query head"
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=0.5,
        help="recall below which the default rule copies a layer synchronously (default: 0.5)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts (and of calibration)")
    parser.add_argument(
        "--out", default="./results/prefetch-recall.json", help="JSON file (default: ./results/prefetch-recall.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def sparsity_config(args: argparse.Namespace) -> Any:
    """The offload-and-prefetch SparsityConfig the options describe; ValueError saying what to change."""
    from doublesparse.config import SparsityConfig

    budget = parse_budget(args.budget, "--budget")
    if not 0.0 <= args.min_recall <= 1.0:
        raise ValueError(f"--min-recall must lie in [0, 1], got {args.min_recall}")
    return SparsityConfig(
        num_channels=args.num_channels,
        token_budget=float(budget),
        label_bits=args.label_bits,
        sink_tokens=args.sink_tokens,
        recent_tokens=args.recent_tokens,
        selection=args.selection,
        offload=True,
        prefetch=True,
        prefetch_min_recall=float(args.min_recall),
    )


def greedy_decode(model: Any, input_ids: Any, cache: Any, steps: int) -> list[int]:
    """Prefill `input_ids` [1, L] into `cache`, then run `steps` greedy decode steps; the tokens fed back."""
    logits = model(input_ids=input_ids, past_key_values=cache).logits[:, -1]
    generated = []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        generated.append(int(token))
        logits = model(input_ids=token, past_key_values=cache).logits[:, -1]
    return generated


def aggregate(prompts: list[dict[str, Any]], num_layers: int, min_recall: float) -> list[dict[str, Any]]:
    """Per layer: recall averaged over every measured step of every prompt, its spread over prompts, the verdict."""
    layers = []
    for index in range(num_layers):
        key = str(index)
        measured = [
            (p["recall"][key], p["recall_steps"][key]) for p in prompts if key in p["recall"] and p["recall_steps"][key]
        ]
        steps = sum(count for _, count in measured)
        if not steps:
            layers.append(
                {"layer": index, "predicted": False, "mean_recall": None, "steps": 0, "copy": "sync (not predicted)"}
            )
            continue
        mean = sum(recall * count for recall, count in measured) / steps
        per_prompt = [recall for recall, _ in measured]
        layers.append(
            {
                "layer": index,
                "predicted": True,
                "mean_recall": mean,
                "steps": steps,
                "min_prompt_recall": min(per_prompt),
                "max_prompt_recall": max(per_prompt),
                "copy": "sync" if mean < min_recall else "prefetch",
            }
        )
    return layers


def format_table(document: dict[str, Any]) -> str:
    """The per-layer results as a fixed-width table."""
    settings = document["settings"]
    config = settings["sparsity_config"]
    lines = [
        f"prefetch recall: {document['model']['description']}; {settings['num_prompts']} {settings['task']} prompts of "
        f"{settings['context_length']} tokens, {settings['steps']} decode steps each; budget {settings['budget']}, "
        f"r={config['num_channels']}, {config['label_bits']}-bit labels; "
        f"rule: sync if recall < {settings['min_recall']}",
        f"{'layer':>5} {'mean recall':>11} {'min':>6} {'max':>6} {'steps':>6}  copy",
    ]
    for row in document["layers"]:
        if not row["predicted"]:
            lines.append(f"{row['layer']:>5} {'-':>11} {'-':>6} {'-':>6} {row['steps']:>6}  {row['copy']}")
            continue
        lines.append(
            f"{row['layer']:>5} {row['mean_recall']:>11.3f} {row['min_prompt_recall']:>6.3f} "
            f"{row['max_prompt_recall']:>6.3f} {row['steps']:>6}  {row['copy']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `doublesparse recall`: print the per-layer table and write the JSON."""
    import torch
    from tqdm.auto import tqdm

    import doublesparse as ds
    from doublesparse.channels import atomic_write
    from doublesparse.output_paths import check_output_file
    from doublesparse.provenance import provenance

    from ..bench.common import resolve_device
    from ..data.synthetic import retrieval_prompts
    from ..models.channel_masks import CALIBRATE, load_channel_mask, obtain_channel_mask, shipped_mask_path
    from ..models.source import BUNDLED, TINY_RANDOM, resolve_model
    from .checks import check_model_argument

    # Every option is checked before any weights load.
    config = sparsity_config(args)
    for name in ("context_length", "num_prompts", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    check_model_argument(args.model)
    source = resolve_model(args.model, seed=args.seed)
    layout = source.layout()
    config.check_model(layout.num_layers, layout.head_dim)
    if layout.num_layers < 2:
        raise ValueError(
            f"model {source.name!r} has {layout.num_layers} layer: prefetching predicts layer i+1 from "
            "layer i, pick a model with 2 or more"
        )
    positions = getattr(source.config(), "max_position_embeddings", None)
    if positions is not None and args.context_length + args.steps > positions:
        raise ValueError(
            f"--context-length + --steps = {args.context_length + args.steps} exceeds the model's "
            f"{positions} positions: lower them"
        )
    channels = args.channels
    if channels is None:
        shipped = shipped_mask_path() if source.name == BUNDLED else None
        channels = str(shipped) if shipped else CALIBRATE
    if channels == CALIBRATE and source.name not in (BUNDLED, TINY_RANDOM):
        raise ValueError(
            "--channels calibrate uses the bundled model's calibration text; pass --channels with a mask "
            "made for this model"
        )
    if channels != CALIBRATE:
        load_channel_mask(channels, layout)
    out = check_output_file(args.out, "--out")

    torch.manual_seed(args.seed)
    model, tokenizer = source.load()
    model.to(device)
    mask, channels_info = obtain_channel_mask(
        channels, source, model, tokenizer, seed=args.seed, progress=not args.no_progress
    )
    prompts = retrieval_prompts(args.task, tokenizer, args.context_length, args.num_prompts, args.seed)

    per_prompt = []
    with torch.no_grad(), ds.patched(model, mask, config):
        for prompt, answer in tqdm(prompts, desc="recall", disable=args.no_progress):
            input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            cache = ds.make_cache(model, measure_recall=True)
            generated = greedy_decode(model, input_ids, cache, args.steps)
            report = cache.prefetch_report()
            per_prompt.append(
                {
                    "prompt_tokens": int(input_ids.shape[1]),
                    "answer": answer,
                    "generated": tokenizer.decode(generated),
                    "recall": report["recall"],
                    "recall_steps": report["recall_steps"],
                    "cache_sync_layers": report["sync_layers"],
                }
            )

    document = {
        "format": "doublesparse.prefetch_recall",
        "options": {name: value for name, value in vars(args).items() if not name.startswith("_")},
        "model": source.info(),
        "channels": channels_info,
        "settings": {
            "task": args.task,
            "context_length": args.context_length,
            "num_prompts": args.num_prompts,
            "steps": args.steps,
            "seed": args.seed,
            "budget": args.budget,
            "min_recall": args.min_recall,
            "device": str(device),
            "sparsity_config": config.to_dict(),
        },
        **provenance(device),
        "layers": aggregate(per_prompt, layout.num_layers, args.min_recall),
        "prompts": per_prompt,
    }
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2, default=str) + "\n"))
    if not source.trained:
        print(f"NOTE: {source.description}")
    print(format_table(document))
    print(f"wrote {out}")
    return 0

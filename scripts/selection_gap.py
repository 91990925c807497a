"""Where token selection loses attention mass, layer by layer: Double Sparsity's labels against the exact oracle.

For held-out windows of a text, the post-RoPE q and k of every layer are captured in one dense pass. For the
last `--rows` positions of each window (decode-like: each row's past is almost the whole window), each
selection rule picks `ceil(budget x past)` tokens, and we measure the share of the exact attention mass
(softmax over the whole past, averaged over query heads) that the selected tokens carry, relative to
the share the oracle's selection carries (`oracle`: top-k by exact q.k, max over the query heads of a
KV group, as `oracle_topk` selects). Rules:

- `oracle_head`: the exact oracle with one selection per query head: what the group reduction costs;
- `channels_r{r}`, `channels_head_r{r}`: Double Sparsity's channel labels, group or per-query-head selection;
- `projection_r{r}`: low-rank projection labels (SparsityConfig(labels="projection"));
- `channels_by_layer_r{r}`: channel labels with r chosen per layer from the calibrated concentration, r on
  average: starting from 4 channels everywhere, 2 more go, again and again, to the layer whose next two
  channels add the most of its qk statistic (the same label bytes as a uniform r).

Labels are made and scored by the runtime's own kernels (`make_labels`, `label_scores`), at `--label-bits`.
Writes JSON (per layer and mean) and prints a table.

    python scripts/selection_gap.py --model smollm2 --channels mask.safetensors --text pydoc-topics:heldout \
        --window 2048 --num-windows 2 --rows 64 --budget 1/16 --out gap.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def capture_qk(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE (q [H_q, T, d], k [H_kv, T, d]) of every layer from one dense pass."""
    from doublesparse.attention_patch import attention_patched
    from doublesparse.layout import HeadLayout
    from doublesparse.step import dense_attention
    from doublesparse.support import attention_modules

    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query[0].detach().float(), key[0].detach().float())
        return dense_attention(module, query, key, value, attention_mask, **kwargs)

    modules = attention_modules(model, HeadLayout.from_config(model.config))
    with torch.no_grad(), attention_patched(model, "selection_gap_capture", record, "_gap", dict.fromkeys(modules, 1)):
        model(input_ids=input_ids, use_cache=False)
    return store


def rule_scores(name: str, query: torch.Tensor, key: torch.Tensor, layer: int, mask, bits: int) -> torch.Tensor:
    """Selection scores [H_select, L, T] of rule `name` for query rows [H_q, L, d] over keys [H_kv, T, d]."""
    from doublesparse.config import SparsityConfig
    from doublesparse.kernels import dispatch
    from doublesparse.kernels.label_projection import query_labels
    from doublesparse.plan import label_maps_of

    num_q, num_kv = query.shape[0], key.shape[0]
    if name.startswith("oracle"):
        exact = torch.einsum("hld,htd->hlt", query, key.repeat_interleave(num_q // num_kv, dim=0))
        return exact if name == "oracle_head" else exact.view(num_kv, num_q // num_kv, *exact.shape[1:]).amax(1)
    kind, rank = name.rsplit("_r", 1)
    selection = "head" if kind == "channels_head" else "group"
    labels = "projection" if kind == "projection" else "channels"
    if kind == "channels_by_layer":
        rank = allocate_ranks(mask, int(rank))[layer]
    config = SparsityConfig(num_channels=int(rank), label_bits=bits, labels=labels, selection=selection)
    layer_mask = mask.per_kv() if selection == "group" else mask
    label_map = label_maps_of(layer_mask, config)[layer]
    stored = dispatch.make_labels(key[None], label_map, bits, "torch")
    heads = num_kv if selection == "group" else num_q
    return dispatch.label_scores(query_labels(query[None], label_map), stored, bits, 1.0, heads, "torch")[0]


def allocate_ranks(mask, mean_rank: int, step: int = 2, least: int = 4) -> list[int]:
    """Channels per layer, `mean_rank` on average, greedily to where the next `step` add the most qk statistic."""
    statistic = mask.per_kv().statistics["qk"].double().sort(dim=-1, descending=True).values
    share = statistic / statistic.sum(dim=-1, keepdim=True)  # [layers, kv heads, d], largest first
    ranks = [least] * mask.num_layers
    while sum(ranks) < mean_rank * mask.num_layers:
        gains = [
            float(share[i, :, r : r + step].sum(-1).mean()) if r + step <= mask.head_dim else -1.0
            for i, r in enumerate(ranks)
        ]
        ranks[max(range(len(ranks)), key=gains.__getitem__)] += step
    return ranks


def captured_mass(weights: torch.Tensor, scores: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Mass [H_q, L] of the weights [H_q, L, T] on each row's top-`budget` tokens by `scores` [H_s, L, T]."""
    num_q, rows, _ = weights.shape
    per_select = num_q // scores.shape[0]
    out = torch.empty(num_q, rows)
    for row, budget in enumerate(budgets):
        top = scores[:, row].topk(budget, dim=-1).indices.repeat_interleave(per_select, dim=0)
        out[:, row] = weights[:, row].gather(-1, top).sum(-1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--channels", required=True, help="channel mask (with projections for projection rules)")
    parser.add_argument("--text", default="pydoc-topics:heldout")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--num-windows", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64, help="last positions of each window scored")
    parser.add_argument("--budget", default="1/16")
    parser.add_argument("--label-bits", type=int, default=16, choices=(16, 8, 4))
    parser.add_argument(
        "--rules",
        default="oracle_head,channels_r8,channels_r16,channels_head_r16,channels_by_layer_r8,channels_by_layer_r16,"
        "projection_r8,projection_r16",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from doublesparse.channels import ChannelMask
    from doublesparse.eval.harness.budgets import parse_budget
    from doublesparse.eval.tasks.perplexity import load_text
    from doublesparse.layout import HeadLayout
    from doublesparse.loading import load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    budget = float(parse_budget(args.budget))
    model, tokenizer = load_model(args.model)
    layout = HeadLayout.from_config(model.config)
    mask = ChannelMask.load(args.channels, layout=layout)
    text, description = load_text(args.text)
    ids = tokenizer(text[: args.window * args.num_windows * 8], add_special_tokens=False)["input_ids"]
    rules = ["oracle"] + [r for r in args.rules.split(",") if r]
    sums = {rule: torch.zeros(layout.num_layers) for rule in rules}
    overlap = {rule: torch.zeros(layout.num_layers) for rule in rules}
    counted = 0
    for window in range(args.num_windows):
        chunk = torch.tensor([ids[window * args.window : (window + 1) * args.window]])
        qk = capture_qk(model, chunk)
        length = chunk.shape[1]
        first = length - args.rows
        budgets = [max(1, math.ceil(budget * (first + i + 1) - 1e-9)) for i in range(args.rows)]
        for layer, (query, key) in qk.items():
            rows = query[:, first:]
            exact = torch.einsum("hld,htd->hlt", rows, key.repeat_interleave(layout.group_size, dim=0))
            causal = torch.arange(length)[None, :] <= (first + torch.arange(args.rows))[:, None]
            weights = torch.softmax((exact * model.config.head_dim**-0.5).masked_fill(~causal, float("-inf")), -1)
            chosen = {}
            for rule in rules:
                scores = rule_scores(rule, rows, key, layer, mask, args.label_bits).masked_fill(~causal, float("-inf"))
                chosen[rule] = scores
                sums[rule][layer] += captured_mass(weights, scores, budgets).mean()
            oracle_top = [set(chosen["oracle"][0, i].topk(b).indices.tolist()) for i, b in enumerate(budgets)]
            for rule in rules:
                top = [set(chosen[rule][0, i].topk(b).indices.tolist()) for i, b in enumerate(budgets)]
                overlap[rule][layer] += sum(len(a & o) / len(o) for a, o in zip(top, oracle_top)) / len(budgets)
        counted += 1
    mass = {rule: (sums[rule] / counted) for rule in rules}
    relative = {rule: (mass[rule] / mass["oracle"]) for rule in rules}
    document = {
        "command": "python scripts/selection_gap.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "text": description,
        "budget": args.budget,
        "label_bits": args.label_bits,
        "rows": args.rows,
        "window": args.window,
        "num_windows": args.num_windows,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
        "oracle_mass_per_layer": mass["oracle"].tolist(),
        "relative_mass": {
            rule: {"mean": float(relative[rule].mean()), "per_layer": relative[rule].tolist()} for rule in rules
        },
        "oracle_overlap": {
            rule: {"mean": float((overlap[rule] / counted).mean()), "per_layer": (overlap[rule] / counted).tolist()}
            for rule in rules
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"mass captured relative to the oracle's (budget {args.budget}, {args.label_bits}-bit labels, "
        f"{args.num_windows} x {args.rows} rows of {args.window}-token windows), mean over layers:"
    )
    for rule in rules:
        agreement = float((overlap[rule] / counted).mean())
        print(f"  {rule:<20} {relative[rule].mean():.3f}   overlap with oracle {agreement:.3f}")
    print("per layer (oracle mass | " + " | ".join(rules[1:]) + "):")
    for layer in range(layout.num_layers):
        cells = " ".join(f"{float(relative[r][layer]):.3f}" for r in rules[1:])
        print(f"  {layer:>2} {float(mass['oracle'][layer]):.3f} | {cells}")
    print(f"{document['seconds']} s")


if __name__ == "__main__":
    main()

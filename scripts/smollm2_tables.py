"""The Markdown tables of docs/results.md's SmolLM2 section, read from the result files the study wrote.

    python scripts/smollm2_tables.py [docs/results/smollm2]

Nothing is typed by hand: every figure in the tables comes from a results JSON (or the gap JSON) there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGETS = ("1/4", "1/8", "1/16", "1/32")
TASKS = (("passkey", "passkey"), ("needle", "needle"), ("perplexity", "ppl"))
DS = "double_sparsity"
WINDOW = "sink_tokens=4+recent_tokens=16"
# (method variant of ablations/variants.json, what it changes), each against the plain setting.
ABLATIONS = (
    (f"{DS}+num_channels=8", "r = 8"),
    (f"{DS}+label_bits=4", "4-bit labels"),
    (f"{DS}+num_channels=8+label_bits=4", "r = 8, 4-bit labels"),
    (f"{DS}+selection=head", "selection per query head"),
    (f"{DS}+{WINDOW}", "sink 4 + recent 16"),
    (f"{DS}+dense_layers=0", "layer 0 dense"),
    (f"{DS}+labels=projection", "projection labels"),
    (f"{DS}+labels=projection+num_channels=8", "projection, r = 8"),
    (f"{DS}+labels=projection+label_bits=4", "projection, 4-bit labels"),
    (f"{DS}+labels=projection+num_channels=8+label_bits=4", "projection, r = 8, 4-bit"),
    (f"{DS}+labels=projection+{WINDOW}", "projection, sink 4 + recent 16"),
    (f"{DS}+labels=projection+label_bits=4+{WINDOW}", "projection, 4-bit, sink 4 + recent 16"),
    (f"{DS}+label_bits=4+{WINDOW}", "4-bit, sink 4 + recent 16 (the defaults)"),
    (f"{DS}+selection=head+{WINDOW}", "selection per query head, sink 4 + recent 16"),
    ("oracle_topk", "oracle_topk (for reference)"),
    (f"oracle_topk+{WINDOW}", "oracle_topk, sink 4 + recent 16"),
)


def cell(row: dict | None, task: str) -> str:
    """Accuracy with two decimals (20 prompts: steps of 0.05), perplexity with two."""
    return "" if row is None else f"{row['value']:.2f}"


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def index(document: dict) -> dict:
    return {(r["task"], r["method"], r["sparsity_label"]): r for r in document.get("results", [])}


def main_table(document: dict) -> str:
    rows = index(document)
    methods = list(dict.fromkeys(r["method"] for r in document["results"]))
    columns = [(task, label) for task, _ in TASKS for label in ("dense",) + BUDGETS]
    short = dict(TASKS)
    header = ["method"] + [f"{short[t]} {label}" for t, label in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in methods:
        cells = [method] + [cell(rows.get((t, method, label)), t) for t, label in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(folder: Path, main: dict) -> str:
    header = ["Double Sparsity setting"] + [f"{short} {b}" for _, short in TASKS for b in BUDGETS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    variants = index(load(folder / "ablations" / "variants.json"))
    code = index(load(folder / "ablations" / "code-calibrated.json"))
    settings = [("plain (r = 16, 16-bit, group, no sink/recent, prose-calibrated)", variants, DS)]
    settings += [(label, variants, method) for method, label in ABLATIONS]
    settings += [("calibrated on code (bundled text)", code, DS), ("calibrated on code, projection", code,
                 f"{DS}+labels=projection")]  # fmt: skip
    for label, rows, method in settings:
        cells = [cell(rows.get((t, method, b)), t) for t, _ in TASKS for b in BUDGETS]
        if any(cells):
            lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def perplexity_table(document: dict) -> str:
    """One row per method: dense perplexity, or the perplexity at each budget."""
    rows = index(document)
    methods = list(dict.fromkeys(r["method"] for r in document["results"]))
    lines = ["| method | dense | " + " | ".join(BUDGETS) + " |", "|---" * (len(BUDGETS) + 2) + "|"]
    for method in methods:
        cells = [cell(rows.get(("perplexity", method, label)), "perplexity") for label in ("dense",) + BUDGETS]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines)


def gap_table(folder: Path) -> str:
    lines = []
    for bits in (16, 4):
        gap = load(folder / f"gap-bits{bits}.json")
        if not gap:
            continue
        rules = list(gap["relative_mass"])
        if not lines:
            lines = [
                "| rule | labels | mass kept / oracle's (mean) | layer 0 | layer 1 | layer 2 | worst layer | "
                "top-k overlap with oracle |",
                "|---|---|---|---|---|---|---|---|",
            ]
        for rule in rules:
            per_layer = gap["relative_mass"][rule]["per_layer"]
            worst = min(range(len(per_layer)), key=per_layer.__getitem__)
            lines.append(
                f"| {rule} | {bits}-bit | {gap['relative_mass'][rule]['mean']:.3f} | {per_layer[0]:.3f} | "
                f"{per_layer[1]:.3f} | {per_layer[2]:.3f} | {per_layer[worst]:.3f} (layer {worst}) | "
                f"{gap['oracle_overlap'][rule]['mean']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/smollm2")
    for context in (1024, 2048, 4096, 8192):
        document = load(folder / f"main-{context}.json")
        if document:
            tasks = document["tasks"]
            notes = ", ".join(
                f"{name}: {t['settings'].get('num_samples') or t['settings'].get('num_windows')} "
                f"{'prompts' if name != 'perplexity' else 'windows'}"
                for name, t in tasks.items()
            )
            flags = [name for name, t in tasks.items() if t.get("informative") is False]
            print(f"### {context} tokens ({notes}{'; NOT INFORMATIVE: ' + ', '.join(flags) if flags else ''})\n")
            print(main_table(document) + "\n")
    main = load(folder / "main-2048.json")
    if main:
        print("### Double Sparsity ablations at 2048 tokens\n")
        print(ablation_table(folder, main) + "\n")
    code = load(folder / "ablations" / "code-text.json")
    if code:
        print("### Continuation perplexity on code (the bundled held-out text), 2048 tokens\n")
        print(perplexity_table(code) + "\n")
    print("### Selection gap per layer (2048-token windows, budget 1/16)\n")
    print(gap_table(folder))


if __name__ == "__main__":
    main()

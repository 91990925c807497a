"""Result files of an evaluation grid: the JSON document, CSV, a screen or Markdown table, and a plot.

Results are plain rows (dicts); `results_document` wraps them with everything needed to reproduce
them (versions, seed, configs, model and channel-mask identity); `write_json`, `write_csv`,
`format_table` and `plot_results` turn them into files, a screen table and a figure.
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from doublesparse.output_paths import atomic_write, save_figure, write_text

from .budgets import sparsity_label
from .plan import GridSpec


def environment() -> dict[str, Any]:
    """Versions, platform and the checkout's commit, for result files."""
    import torch
    import transformers

    import doublesparse
    from doublesparse.provenance import git_commit

    versions = {
        "doublesparse": doublesparse.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for optional in ("lm_eval", "datasets"):
        module = sys.modules.get(optional)
        if module is not None:
            versions[optional] = getattr(module, "__version__", "unknown")
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),  # with -dirty when tracked files had changed; None outside a git checkout
    }


def results_document(
    rows: list[dict[str, Any]],
    spec: GridSpec,
    model_info: dict[str, Any],
    channels_info: dict[str, Any],
    command: Sequence[str],
) -> dict[str, Any]:
    """Everything a result file holds: rows plus the settings that reproduce them."""
    return {
        "format": "doublesparse.eval.results",
        "format_version": "1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "seed": spec.seed,
        "model": model_info,
        "channels": channels_info,
        "base_config": spec.base_config.to_dict(),
        "sparsities": spec.sparsities,
        "methods": {m.name: {"description": m.description, "settings": m.settings()} for m in spec.methods},
        "tasks": {
            t.name: {
                "metric": t.metric,
                "higher_is_better": t.higher_is_better,
                "teacher_forced": t.teacher_forced,
                "protocol": t.protocol,
                "settings": t.settings(),
                "informative": _informative(rows, t.name),
            }
            for t in spec.tasks
        },
        "environment": environment(),
        **spec.extra,
        "results": rows,
    }


def _informative(rows: list[dict[str, Any]], task: str) -> Any:
    """Whether an accuracy task can tell methods apart (dense accuracy >= 0.5); None when unknown or not accuracy."""
    return next((r.get("informative") for r in rows if r["task"] == task), None)


def write_json(document: dict[str, Any], path: Path) -> None:
    """Write the result document as indented JSON, atomically."""
    write_text(path, json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path, seed: int, model_name: str) -> None:
    """One CSV line per run, with the seed, model and config needed to reproduce it."""
    atomic_write(path, lambda tmp: _write_csv(rows, Path(tmp), seed, model_name))


def _write_csv(rows: list[dict[str, Any]], path: Path, seed: int, model_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [
        "task",
        "protocol",
        "method",
        "sparsity",
        "sparsity_label",
        "metric",
        "value",
        "samples",
        "seconds",
        "informative",
        "seed",
        "model",
        "config",
    ]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            config = json.dumps(row["config"], sort_keys=True)
            writer.writerow({**{c: row.get(c) for c in columns}, "seed": seed, "model": model_name, "config": config})


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, one row of cells per method): a column per (task, sparsity), dense in its own column."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(r["sparsity_label"] for r in rows if r["sparsity"] is not None))
    labels.sort(key=lambda label: -float(Fraction(label)))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    values = {(r["task"], r["method"], r["sparsity_label"]): r["value"] for r in rows}
    metric = {r["task"]: r["metric"] for r in rows}
    columns = []
    for task in tasks:
        columns.append((task, "dense"))
        columns.extend((task, label) for label in labels)
    named = {t: t if metric[t] == t else f"{t} {metric[t]}" for t in tasks}  # "perplexity", "kv_retrieval accuracy"
    for t in tasks:
        if any(r["task"] == t and r.get("informative") is False for r in rows):
            named[t] += " [NOT INFORMATIVE: dense < 0.5]"
    headers = ["method"] + [f"{named[t]} (dense)" if label == "dense" else f"{t} @{label}" for t, label in columns]
    body = []
    for method in methods:
        line = [method]
        for task, label in columns:
            value = values.get((task, method, label))
            line.append("" if value is None else f"{value:.3f}" if metric[task] == "accuracy" else f"{value:.4g}")
        body.append(line)
    return headers, body


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the results, for the screen."""
    headers, body = table_cells(rows)
    widths = [max(len(x) for x in column) for column in zip(headers, *body)]

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(headers), render(["-" * w for w in widths])] + [render(line) for line in body])


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown."""
    headers, body = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])


def plot_results(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Metric against sparsity per method, one panel per task, dense as a dashed line (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        for method in dict.fromkeys(r["method"] for r in task_rows):
            points = sorted(
                (r["sparsity"], r["value"]) for r in task_rows if r["method"] == method and r["sparsity"] is not None
            )
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for r in task_rows:
            if r["sparsity"] is None:
                axis.axhline(r["value"], color="black", linestyle="--", linewidth=1, label=f"{r['method']}")
        sparsities = sorted({r["sparsity"] for r in task_rows if r["sparsity"] is not None})
        axis.set_xscale("log", base=2)
        axis.set_xticks(sparsities, [sparsity_label(s) for s in sparsities])
        axis.minorticks_off()
        axis.invert_xaxis()  # sparser to the right
        axis.set_xlabel("token budget (fraction of the context)")
        axis.set_ylabel(metric)
        if metric == "accuracy":
            axis.set_ylim(-0.03, 1.03)
        if metric == "perplexity":
            axis.set_yscale("log")  # the methods span several times the dense perplexity
        protocol = task_rows[0].get("protocol")
        uninformative = any(r.get("informative") is False for r in task_rows)
        axis.set_title(
            f"{task} ({protocol})" + (" - not informative: dense < 0.5" if uninformative else "") if protocol else task
        )
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        save_figure(figure, path)  # atomically, in the format the suffix names
    finally:
        plt.close(figure)

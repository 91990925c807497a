"""The evaluation loop shared by `doublesparse eval` and `doublesparse run`: a checked plan in, result files out.

`evaluate_grid` runs every (task, method, sparsity) on one loaded model, sample by sample: each sample's
prompt is prefilled densely once (`dense_prefix`, on the unpatched model) and every method and budget
continues from a copy of it, so the grid costs one prefill per prompt, not one per run. Every measured
sample goes to the journal (JSONL) at once. `execute_plan` loads the model, gets its channel mask, runs
the grid and writes the result files.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .budgets import sparsity_label
from .journal import Journal, run_key
from .plan import EvalPlan, GridSpec

logger = logging.getLogger(__name__)

# Retrieval tasks whose dense accuracy is below this cannot tell methods apart: flagged as not informative.
INFORMATIVE_DENSE_ACCURACY = 0.5


def grid_runs(spec: GridSpec) -> list[tuple[Any, Optional[float]]]:
    """(method, sparsity) pairs of a grid: dense once, every sparse method at every sparsity."""
    return [(m, s) for m in spec.methods for s in ([None] if not m.sparse else spec.sparsities)]


def evaluate_grid(
    model: Any,
    tokenizer: Any,
    channels: Any,
    spec: GridSpec,
    progress: bool = True,
    journal: Optional[Journal] = None,
    identity: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Run every (task, method, sparsity) sample by sample over shared dense prefixes; one row per run."""
    import torch
    from tqdm.auto import tqdm

    from ..methods.prefix import dense_prefix

    journal = journal or Journal(None)
    runs = grid_runs(spec)
    for task in spec.tasks:
        task.prepare(tokenizer, spec.seed)
    total = sum(task.num_samples() for task in spec.tasks) * len(runs)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="evaluating", unit="run", disable=not progress, file=sys.stderr) as bar:
        for task in spec.tasks:
            configs = [m.run_config(_config(spec, task, s)) for m, s in runs]
            keys = [
                run_key(identity or {}, task, m, c.to_dict() if m.sparse else None) for (m, _), c in zip(runs, configs)
            ]
            figures: list[list[dict[str, Any]]] = [[] for _ in runs]
            for index in range(task.num_samples()):
                todo = []
                for slot, key in enumerate(keys):
                    record = journal.measured(key, index)
                    if record is None:
                        todo.append(slot)
                    else:
                        figures[slot].append(record)
                bar.update(len(runs) - len(todo))
                if not todo:
                    continue
                ids = task.prefix_ids(index)
                with torch.no_grad():
                    prefix = None
                    if ids is not None:
                        received = any(runs[slot][0].needs_prefix_attention for slot in todo)
                        prefix = dense_prefix(model, ids, attention_received=received)
                    for slot in todo:
                        method, sparsity = runs[slot]
                        bar.set_postfix_str(f"{task.name} #{index} {method.name} {sparsity_label(sparsity)}")
                        config = configs[slot]
                        started = time.perf_counter()
                        with method.patch(model, config, channels):
                            cache = method.prefix_cache(model, prefix) if prefix is not None else None
                            measured = task.evaluate_sample(model, index, cache)
                        record = {
                            "task": task.name,
                            "method": method.name,
                            "sparsity": sparsity,
                            "figures": measured,
                            "seconds": round(time.perf_counter() - started, 3),
                        }
                        journal.add_sample(keys[slot], index, record)
                        figures[slot].append(record)
                        bar.update(1)
            for slot, (method, sparsity) in enumerate(runs):
                row = _result_row(task, method, sparsity, configs[slot], figures[slot])
                journal.add_result(row)
                rows.append(row)
                logger.info(
                    "%s %s %s: %s=%.4g", task.name, method.name, sparsity_label(sparsity), task.metric, row["value"]
                )
    flag_informative(rows)
    return rows


def _config(spec: GridSpec, task: Any, sparsity: Optional[float]) -> Any:
    budget = 1.0 if sparsity is None else sparsity
    return spec.base_config.replace(token_budget=budget, simulate=task.teacher_forced)


def _result_row(task: Any, method: Any, sparsity: Optional[float], config: Any, records: list) -> dict[str, Any]:
    figures = task.aggregate([r["figures"] for r in records])
    return {
        "task": task.name,
        "protocol": task.protocol,
        "method": method.name,
        "sparsity": sparsity,
        "sparsity_label": sparsity_label(sparsity),
        "metric": task.metric,
        "value": figures[task.metric],
        "higher_is_better": task.higher_is_better,
        "figures": figures,
        "samples": len(records),
        "seconds": round(sum(r["seconds"] for r in records), 3),
        "config": config.to_dict() if method.sparse else None,
    }


def flag_informative(rows: list[dict[str, Any]]) -> None:
    """Mark each accuracy task's rows `informative`: False where dense accuracy is below 0.5 (None: no dense row)."""
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        if task_rows[0]["metric"] != "accuracy":
            continue
        dense = [r["value"] for r in task_rows if r["sparsity"] is None]
        informative = (dense[0] >= INFORMATIVE_DENSE_ACCURACY) if dense else None
        for row in task_rows:
            row["informative"] = informative


def execute_plan(
    plan: EvalPlan, progress: bool = True, command: Optional[list[str]] = None, mask_out: Optional[Path] = None
) -> dict[str, Any]:
    """Load the model, get the channels, run the grid, write the outputs; return the result document."""
    import torch

    from ..models.channel_masks import CALIBRATE, obtain_channel_mask
    from .results import format_table, plot_results, results_document, write_csv, write_json

    torch.manual_seed(plan.spec.seed)
    model, tokenizer = plan.source.load()
    mask, channels_info = obtain_channel_mask(
        plan.channels, plan.source, model, tokenizer, seed=plan.spec.seed, progress=progress
    )
    if plan.channels == CALIBRATE and mask_out is not None:
        mask.save(mask_out)
        channels_info["saved_to"] = str(mask_out)
    command = command or sys.argv
    journal = Journal(plan.out_jsonl, resume=plan.resume, header={"command": list(command)})
    identity = {"model": plan.source.info(), "channels": channels_info, "seed": plan.spec.seed}
    rows = evaluate_grid(model, tokenizer, mask, plan.spec, progress=progress, journal=journal, identity=identity)
    document = results_document(rows, plan.spec, plan.source.info(), channels_info, command)
    if plan.out_json is not None:
        write_json(document, plan.out_json)
    if plan.out_csv is not None:
        write_csv(rows, plan.out_csv, plan.spec.seed, plan.source.name)
    if plan.out_plot is not None:
        plot_results(rows, plan.out_plot, f"{plan.source.description}, seed {plan.spec.seed}")
    document["table"] = format_table(rows)
    return document

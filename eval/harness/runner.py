"""The evaluation loop shared by `doublesparse eval` and `doublesparse run`: a checked plan in, result files out.

`evaluate_grid` runs every (task, method, sparsity) on one loaded model; dense runs once per task.
`execute_plan` loads the model, gets its channel mask, runs the grid and writes the result files.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .budgets import sparsity_label
from .plan import EvalPlan, GridSpec

logger = logging.getLogger(__name__)


def evaluate_grid(
    model: Any, tokenizer: Any, channels: Any, spec: GridSpec, progress: bool = True
) -> list[dict[str, Any]]:
    """Run every (task, method, sparsity); prepare each task once; one row per run."""
    from tqdm.auto import tqdm

    runs = []
    for task in spec.tasks:
        for method in spec.methods:
            for sparsity in ([None] if not method.sparse else spec.sparsities):
                runs.append((task, method, sparsity))
    rows: list[dict[str, Any]] = []
    prepared: set[int] = set()
    bar = tqdm(runs, desc="evaluating", unit="run", disable=not progress, file=sys.stderr)
    for task, method, sparsity in bar:
        bar.set_postfix_str(f"{task.name} {method.name} {sparsity_label(sparsity)}")
        if id(task) not in prepared:
            task.prepare(tokenizer, spec.seed)
            prepared.add(id(task))
        budget = 1.0 if sparsity is None else sparsity
        config = spec.base_config.replace(token_budget=budget, simulate=task.teacher_forced)
        started = time.perf_counter()
        with method.patch(model, config, channels):
            figures = task.evaluate(model, tokenizer, progress=False)
        rows.append(
            {
                "task": task.name,
                "method": method.name,
                "sparsity": sparsity,
                "sparsity_label": sparsity_label(sparsity),
                "metric": task.metric,
                "value": figures[task.metric],
                "higher_is_better": task.higher_is_better,
                "figures": figures,
                "seconds": round(time.perf_counter() - started, 3),
                "config": config.to_dict() if method.sparse else None,
            }
        )
        logger.info("%s %s %s: %s=%.4g", task.name, method.name, sparsity_label(sparsity), task.metric,
                    figures[task.metric])
    return rows


def execute_plan(
    plan: EvalPlan, progress: bool = True, command: Optional[list[str]] = None, mask_out: Optional[Path] = None
) -> dict[str, Any]:
    """Load the model, get the channels, run the grid, write the outputs; return the result document."""
    import torch

    from ..models.channel_masks import CALIBRATE, obtain_channel_mask
    from .results import format_table, plot_results, results_document, write_csv, write_json

    torch.manual_seed(plan.spec.seed)
    model, tokenizer = plan.source.load()
    mask, channels_info = obtain_channel_mask(plan.channels, plan.source, model, tokenizer, seed=plan.spec.seed,
                                              progress=progress)
    if plan.channels == CALIBRATE and mask_out is not None:
        mask.save(mask_out)
        channels_info["saved_to"] = str(mask_out)
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

"""What the evaluation commands check of their command line before any work, beyond what the plan checks.

The plan (`harness.plan.plan_evaluation`) checks methods, tasks, sparsities, knobs and the channel
mask; these check what it does not see: whether the `--model` folder holds a model at all (before its
config is read, which would fail inside transformers with a message about what it lacked first), and
whether every result file can be written, so that a run is not lost at its end.
"""

from __future__ import annotations

from typing import Any


def check_model_argument(model: str, option: str = "--model") -> None:
    """ValueError for a `--model` that names a folder or file that holds no model (keywords pass)."""
    from doublesparse.input_checks import check_model_folder

    from ..models.source import BUNDLED, TINY_RANDOM

    if model not in (BUNDLED, TINY_RANDOM):
        check_model_folder(model, option)


def check_plan_outputs(plan: Any, out: str = "--out", csv: str = "--csv", plot: str = "--plot") -> None:
    """ValueError unless every result file of `plan` (JSON, CSV, plot) can be written; each named by its option."""
    from doublesparse.output_paths import check_image_file, check_output_file

    # The journal beside the JSON is written from the first measured sample on: it must be writable too.
    for path, option in ((plan.out_json, out), (plan.out_jsonl, f"{out}'s journal"), (plan.out_csv, csv)):
        if path is not None:
            check_output_file(path, option)
    if plan.out_plot is not None:
        check_image_file(plan.out_plot, plot)


# Options of `doublesparse eval` that only some methods read: option -> the methods that read it.
METHOD_OPTIONS = {
    "kind": ("double_sparsity",),
    "page_size": ("quest",),
    "num_channels": ("double_sparsity", "random_channels", "sparq"),
    "label_bits": ("double_sparsity", "random_channels"),
    "labels": ("double_sparsity",),
}
# Options that every sparse method reads, and no dense one.
SPARSE_OPTIONS = ("sink_tokens", "recent_tokens", "selection")
# Options handed to the tasks (option's name: the task parameter it sets): a task reads those its
# constructor takes (`tasks.make_task`).
TASK_OPTIONS = {
    name: name
    for name in (
        "num_samples",
        "context_length",
        "num_lines",
        "text",
        "window",
        "num_windows",
        "num_needles",
        "protocol",
    )
}
TASK_OPTIONS["continuation_tokens"] = "continuation"


def check_options_used(args: Any, plan: Any) -> None:
    """ValueError for an option set away from its default that no task or method of `plan` reads.

    Such an option would be silently ignored: `--page-size` without quest, `--window` without
    perplexity, `--num-lines` without kv_retrieval, `--channels` when no method uses a mask.
    """
    import inspect

    from ..harness.plan import EvalSettings

    defaults = EvalSettings()
    methods = [method.name for method in plan.spec.methods]
    tasks = plan.spec.tasks

    def given(name: str, field: str = "") -> bool:
        return getattr(args, name) != getattr(defaults, field or name)

    def refuse(name: str, readers: str, present: str) -> None:
        option = "--" + name.replace("_", "-")
        raise ValueError(f"{option} is read by {readers} only, and {present}: drop {option} (it would be ignored)")

    if args.channels is not None and plan.channels is None:
        refuse(
            "channels", "the methods that use a channel mask (double_sparsity)", f"--method runs {', '.join(methods)}"
        )
    for name, readers in METHOD_OPTIONS.items():
        if given(name) and not set(readers) & set(methods):
            refuse(name, ", ".join(readers), f"--method runs {', '.join(methods)}")
    for name in SPARSE_OPTIONS:
        if given(name) and not any(method.sparse for method in plan.spec.methods):
            refuse(name, "the sparse methods", f"--method runs {', '.join(methods)}")
    for name, parameter in TASK_OPTIONS.items():
        if given(name, parameter) and not any(parameter in inspect.signature(type(task)).parameters for task in tasks):
            readers = sorted(
                task_name
                for task_name, factory in _task_factories().items()
                if parameter in inspect.signature(factory).parameters
            )
            refuse(name, ", ".join(readers), f"--task runs {', '.join(task.name for task in tasks)}")


def _task_factories() -> dict[str, Any]:
    from ..tasks import task_registry

    return {"lm_eval:<task>" if name == "lm_eval" else name: factory for name, factory in task_registry().items()}

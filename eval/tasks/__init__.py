"""Evaluation tasks: one small class per task, one contract, one registry.

A task prepares its data once (`prepare`), then scores any patched model (`evaluate`), so every
method and sparsity sees exactly the same prompts. `teacher_forced` tasks run with
`SparsityConfig.simulate=True` (every row selects among its own past); the others decode.

Names: `perplexity`, `kv_retrieval`, `passkey`, `needle` (magic numbers in real prose), and
`lm_eval:<task>` for any lm-eval task (the local tasks shipped in `lm_eval_tasks/` run offline:
`lm_eval:ds_python_mc`, `lm_eval:ds_kv_loglikelihood`).
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Task

LM_EVAL_PREFIX = "lm_eval:"


def task_registry() -> dict[str, Callable[..., Task]]:
    """Task name -> factory taking the task's options as keywords."""
    from .lm_eval_bridge import LmEvalTask
    from .perplexity import PerplexityTask
    from .retrieval import KVRetrievalTask, NeedleTask, PasskeyTask

    return {
        "perplexity": PerplexityTask,
        "kv_retrieval": KVRetrievalTask,
        "passkey": PasskeyTask,
        "needle": NeedleTask,
        "lm_eval": LmEvalTask,
    }


TASK_NAMES = ("perplexity", "kv_retrieval", "passkey", "needle")


def check_task_name(name: str) -> None:
    """Raise ValueError unless `name` is a known task or `lm_eval:<task>`."""
    if name in TASK_NAMES:
        return
    if name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX):
        return
    raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(TASK_NAMES)} and lm_eval:<task name>")


def make_task(name: str, **options: Any) -> Task:
    """A task by name (options the task does not take are ignored); ValueError for unknown names."""
    import inspect

    check_task_name(name)
    registry = task_registry()
    if name.startswith(LM_EVAL_PREFIX):
        factory, options = registry["lm_eval"], {**options, "lm_eval_task": name[len(LM_EVAL_PREFIX) :]}
    else:
        factory = registry[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted and v is not None})

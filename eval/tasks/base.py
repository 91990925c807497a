"""The contract of an evaluation task (kept apart from the registry, which imports every task)."""

from __future__ import annotations

from typing import Any


class Task:
    """One evaluation task: `prepare(tokenizer, seed)` once, then `evaluate(model, tokenizer)` per setting."""

    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    teacher_forced: bool = False  # True: run with SparsityConfig.simulate=True

    def settings(self) -> dict[str, Any]:
        """Options that reproduce the task's data, for result files."""
        return {}

    def prepare(self, tokenizer: Any, seed: int) -> None:
        """Build the task's data (prompts, token windows) from `seed`; called once before any evaluation."""

    def evaluate(self, model: Any, tokenizer: Any, progress: bool = False) -> dict[str, float]:
        """Score `model` (already patched with a method): {metric: value, ...extra figures}."""
        raise NotImplementedError

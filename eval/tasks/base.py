"""The contract of an evaluation task (kept apart from the registry, which imports every task).

A task is a list of samples. A sample may have a dense prefix (`prefix_ids`): the prompt every method
prefills the same way, which the harness prefills once and hands to every method and budget as a cache;
`evaluate_sample` then scores the rows after it. `aggregate` turns the samples' figures into the task's.
`evaluate` runs every sample with the model prefilling each prefix itself (the patched model's own
prefill), the reference the shared prefix is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where samples are scored, so command-line help stays light
    import torch


class Task:
    """One evaluation task: `prepare(tokenizer, seed)` once, then its samples scored under each setting."""

    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    teacher_forced: bool = False  # True: run with SparsityConfig.simulate=True (every row of a pass selects)
    protocol: str = ""  # how the task is scored, named in result files

    def settings(self) -> dict[str, Any]:
        """Options that reproduce the task's data, for result files."""
        return {}

    def prepare(self, tokenizer: Any, seed: int) -> None:
        """Build the task's data (prompts, token windows) from `seed`; called once before any evaluation."""
        self.tokenizer = tokenizer

    def num_samples(self) -> int:
        """Samples scored one by one (a task that only scores as a whole has one)."""
        return 1

    def prefix_ids(self, index: int) -> Optional["torch.Tensor"]:
        """The dense prompt [1, P] of sample `index` that every method prefills alike, or None (no shared prefix)."""
        return None

    def evaluate_sample(self, model: Any, index: int, cache: Any = None) -> dict[str, float]:
        """Figures of sample `index` on `model` (patched with a method), continuing from `cache` (its prefix)."""
        return self.evaluate(model, getattr(self, "tokenizer", None))

    def aggregate(self, figures: list[dict[str, float]]) -> dict[str, float]:
        """The task's figures {metric: value, ...} from its samples' figures, in sample order."""
        if len(figures) != 1:
            raise ValueError(f"{self.name}: {len(figures)} sample figures for a task scored as a whole")
        return figures[0]

    def evaluate(self, model: Any, tokenizer: Any, progress: bool = False) -> dict[str, float]:
        """Score `model` (already patched with a method), each prefix prefilled by the model itself."""
        import torch

        figures = []
        with torch.no_grad():
            for index in range(self.num_samples()):
                ids = self.prefix_ids(index)
                cache = None
                if ids is not None:
                    device = next(model.parameters()).device
                    cache = model(input_ids=ids.to(device), use_cache=True).past_key_values
                figures.append(self.evaluate_sample(model, index, cache))
        return self.aggregate(figures)

"""Perplexity, teacher-forced: every row of a window selects its own tokens among its past (simulate).

The text is cut into non-overlapping windows of `window` tokens (each window is a fresh sequence, so
a row's past is the window up to it); the loss counts every token but each window's first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from .base import Task


def load_text(source: Optional[str]) -> tuple[str, str]:
    """(text, description) from a local file, `dataset:NAME[:CONFIG[:SPLIT]]` (the datasets library), or the bundled held-out text."""
    if source is None or source == "bundled":
        from doublesparse.default_model import default_heldout_text

        return default_heldout_text(), "bundled held-out text (doublesparse/assets/default_model/heldout.txt)"
    if source.startswith("dataset:"):
        parts = source[len("dataset:"):].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "test"
        import datasets  # imported here: the runtime must not need it

        data = datasets.load_dataset(name, config, split=split)
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n\n".join(str(t) for t in data[column]), f"datasets {name} {config or ''} {split} column {column}"
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"perplexity text {source!r} is not a file; pass a text file, dataset:NAME[:CONFIG[:SPLIT]] or bundled")
    return path.read_text(encoding="utf-8"), str(path)


class PerplexityTask(Task):
    """Teacher-forced perplexity over `num_windows` windows of `window` tokens of a text."""

    name = "perplexity"
    metric = "perplexity"
    higher_is_better = False
    teacher_forced = True

    def __init__(self, text: Optional[str] = None, window: int = 512, num_windows: int = 8, batch_size: int = 4) -> None:
        if window < 2 or num_windows < 1 or batch_size < 1:
            raise ValueError(f"perplexity needs window >= 2, num_windows >= 1, batch_size >= 1; got {window}, {num_windows}, {batch_size}")
        self.text_source, self.window, self.num_windows, self.batch_size = text, window, num_windows, batch_size
        self.windows: Optional[torch.Tensor] = None
        self.text_description = ""

    def settings(self) -> dict[str, Any]:
        return {"text": self.text_description or self.text_source, "window": self.window, "num_windows": self.num_windows}

    def prepare(self, tokenizer, seed: int) -> None:
        text, self.text_description = load_text(self.text_source)
        # Encode only as much text as the windows need (about 6 characters per token is generous).
        budget_chars = self.window * self.num_windows * 8
        ids = tokenizer(text[:budget_chars], add_special_tokens=False)["input_ids"]
        available = len(ids) // self.window
        if available < 1:
            raise ValueError(f"the perplexity text has {len(ids)} tokens, fewer than one window of {self.window}")
        count = min(self.num_windows, available)
        self.windows = torch.tensor(ids[: count * self.window], dtype=torch.long).view(count, self.window)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, progress: bool = False) -> dict[str, float]:
        if self.windows is None:
            raise ValueError("call prepare(tokenizer, seed) before evaluate")
        device = next(model.parameters()).device
        total_loss, total_tokens = 0.0, 0
        for start in range(0, len(self.windows), self.batch_size):
            batch = self.windows[start : start + self.batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += float(loss)
            total_tokens += batch[:, 1:].numel()
        mean = total_loss / total_tokens
        return {"perplexity": math.exp(mean), "loss": mean, "tokens": float(total_tokens)}

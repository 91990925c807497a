"""Perplexity of a text, under one of two protocols (named in result files).

The text is cut into non-overlapping windows of `window` tokens, each a fresh sequence.

- `continuation` (the default; decode-faithful): the first `window - continuation` tokens of a window
  are a dense prompt, prefilled as a real prompt is; the last `continuation` tokens are scored
  teacher-forced, every row selecting its own tokens from its whole past under the budget rule, so
  each row attends what one decode step at that length would (at 1/16 after a 4K prompt, ~256 tokens).
  The prompt's last token is fed as the first scored row, so every scored token is predicted by a
  sparse row.
- `every-position`: every position of the window is scored in one teacher-forced pass with no prompt
  (`SparsityConfig.simulate`); early rows have only a few tokens of past and keep one or two at small
  budgets, a much harsher setting than decoding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from .base import Task

PROTOCOLS = ("continuation", "every-position")


def load_text(source: Optional[str]) -> tuple[str, str]:
    """(text, description) from a local file, `pydoc-topics:<split>`, `dataset:NAME[:CONFIG[:SPLIT]]`, or the
    bundled held-out text."""
    from doublesparse.calibration.pydoc_topics import is_topics_source, topic_text, topics_fingerprint

    if source is None or source == "bundled":
        from doublesparse.default_model import default_heldout_text

        return default_heldout_text(), "bundled held-out text (doublesparse/assets/default_model/heldout.txt)"
    if is_topics_source(source):
        fingerprint = topics_fingerprint()
        return topic_text(source), f"{source} ({fingerprint['path']}, sha256 {fingerprint['sha256'][:16]})"
    if source.startswith("dataset:"):
        parts = source[len("dataset:") :].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "test"
        import datasets  # imported here: the runtime must not need it

        data = datasets.load_dataset(name, config, split=split)
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n\n".join(str(t) for t in data[column]), f"datasets {name} {config or ''} {split} column {column}"
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"perplexity text {source!r} is not a file; pass a text file, pydoc-topics:heldout, "
            "dataset:NAME[:CONFIG[:SPLIT]] or bundled"
        )
    return path.read_text(encoding="utf-8"), str(path)


def default_continuation(window: int) -> int:
    """Tokens scored after the prompt when none are asked for: a quarter of the window, at most 128."""
    return max(1, min(128, window // 4))


class PerplexityTask(Task):
    """Perplexity over `num_windows` windows of `window` tokens of a text, by `protocol` (module docstring)."""

    name = "perplexity"
    metric = "perplexity"
    higher_is_better = False

    def __init__(
        self,
        text: Optional[str] = None,
        window: int = 512,
        num_windows: int = 8,
        protocol: str = "continuation",
        continuation: Optional[int] = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"perplexity protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if window < 2 or num_windows < 1:
            raise ValueError(f"perplexity needs window >= 2 and num_windows >= 1; got {window}, {num_windows}")
        if continuation is None:
            continuation = default_continuation(window)
        if protocol == "continuation" and not 1 <= continuation <= window - 2:
            raise ValueError(
                f"perplexity: --continuation-tokens {continuation} must lie in [1, window - 2] = [1, {window - 2}] "
                "so that the window keeps a prompt"
            )
        self.text_source, self.window, self.num_windows = text, window, num_windows
        self.protocol, self.continuation = protocol, continuation
        self.teacher_forced = protocol == "every-position"
        self.windows: Optional[torch.Tensor] = None
        self.text_description = ""

    def settings(self) -> dict[str, Any]:
        settings = {
            "text": self.text_description or self.text_source,
            "window": self.window,
            "num_windows": self.num_windows,
            "protocol": self.protocol,
        }
        if self.protocol == "continuation":
            settings.update(prompt_tokens=self.window - self.continuation, continuation_tokens=self.continuation)
        return settings

    def prepare(self, tokenizer, seed: int) -> None:
        super().prepare(tokenizer, seed)
        text, self.text_description = load_text(self.text_source)
        # Encode only as much text as the windows need (about 6 characters per token is generous).
        budget_chars = self.window * self.num_windows * 8
        ids = tokenizer(text[:budget_chars], add_special_tokens=False)["input_ids"]
        available = len(ids) // self.window
        if available < self.num_windows:
            raise ValueError(
                f"the perplexity text has {len(ids)} tokens: {available} windows of {self.window}, fewer than the "
                f"{self.num_windows} asked for; lower --num-windows or --window, or pass a longer text"
            )
        self.windows = torch.tensor(ids[: self.num_windows * self.window], dtype=torch.long).view(
            self.num_windows, self.window
        )

    def _window(self, index: int) -> torch.Tensor:
        if self.windows is None:
            raise ValueError("call prepare(tokenizer, seed) before evaluating")
        return self.windows[index : index + 1]

    def num_samples(self) -> int:
        return self.num_windows

    def prefix_ids(self, index: int) -> Optional[torch.Tensor]:
        if self.protocol != "continuation":
            return None
        return self._window(index)[:, : self.window - self.continuation - 1]

    @torch.no_grad()
    def evaluate_sample(self, model, index: int, cache: Any = None) -> dict[str, float]:
        window = self._window(index).to(next(model.parameters()).device)
        if self.protocol == "continuation":
            if cache is None:
                raise ValueError("the continuation protocol scores rows after a prefilled prompt: pass its cache")
            first = self.window - self.continuation - 1
            rows, targets = window[:, first:-1], window[:, first + 1 :]
            logits = model(input_ids=rows, past_key_values=cache, use_cache=True).logits.float()
        else:
            logits = model(input_ids=window, use_cache=False).logits.float()[:, :-1]
            targets = window[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        return {"loss_sum": float(loss), "tokens": float(targets.numel())}

    def aggregate(self, figures: list[dict[str, float]]) -> dict[str, float]:
        total = sum(f["loss_sum"] for f in figures)
        tokens = sum(f["tokens"] for f in figures)
        mean = total / tokens
        return {"perplexity": math.exp(mean), "loss": mean, "tokens": tokens}

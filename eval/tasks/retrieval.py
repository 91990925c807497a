"""Retrieval tasks (LongEval-style key-value lines, passkey, needles in prose), scored by greedy decoding.

Each prompt is prefilled densely except its last token (the prefix every method shares); the prompt's
last token and the answer, teacher-forced, are then attended as rows after it, each row selecting its
own tokens from its whole past exactly as its decode step would (a prefill's last row would be dense).
A prompt counts as correct when every answer token is the argmax; counting stops at the first wrong
token, as greedy generation would.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from .base import Task


class RetrievalTask(Task):
    """Accuracy of greedy answers over `num_samples` seeded prompts of about `context_length` tokens."""

    metric = "accuracy"
    protocol = "decode"
    synthetic_task = ""

    def __init__(self, num_samples: int = 20, context_length: int = 1024, num_lines: Optional[int] = None) -> None:
        if num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {num_samples}")
        if num_lines is None and context_length < 64:
            raise ValueError(f"{self.name}: context_length must be >= 64 tokens, got {context_length}")
        self.num_samples_wanted, self.context_length, self.num_lines = num_samples, context_length, num_lines
        self.samples: list[tuple[list[int], list[int]]] = []
        self.seed: Optional[int] = None

    def settings(self) -> dict[str, Any]:
        lengths = [len(p) for p, _ in self.samples]
        return {
            "num_samples": self.num_samples_wanted,
            "context_length": None if self.num_lines else self.context_length,
            "num_lines": self.num_lines,
            "seed": self.seed,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)} if lengths else None,
        }

    def texts(self, tokenizer, seed: int) -> list[tuple[str, str]]:
        """(prompt, answer) texts from `seed`."""
        from ..data import synthetic

        return synthetic.retrieval_prompts(
            self.synthetic_task, tokenizer, self.context_length, self.num_samples_wanted, seed
        )

    def prepare(self, tokenizer, seed: int) -> None:
        super().prepare(tokenizer, seed)
        self.seed = seed
        self.samples = []
        for prompt, answer in self.texts(tokenizer, seed):
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.samples.append((prompt_ids, answer_ids))

    def _sample(self, index: int) -> tuple[list[int], list[int]]:
        if not self.samples:
            raise ValueError("call prepare(tokenizer, seed) before evaluating")
        return self.samples[index]

    def num_samples(self) -> int:
        return len(self.samples) if self.samples else self.num_samples_wanted

    def prefix_ids(self, index: int) -> torch.Tensor:
        """Every prompt token but the last: that one is fed as the first decoded row."""
        prompt_ids, _ = self._sample(index)
        return torch.tensor([prompt_ids[:-1]])

    @torch.no_grad()
    def evaluate_sample(self, model, index: int, cache: Any = None) -> dict[str, float]:
        if cache is None:
            raise ValueError(f"{self.name} decodes after a prefilled prompt: pass its cache")
        prompt_ids, answer_ids = self._sample(index)
        right = answer_tokens_right(model, cache, prompt_ids[-1], answer_ids)
        return {
            "correct": float(right == len(answer_ids)),
            "answer_tokens_right": float(right),
            "answer_tokens": float(len(answer_ids)),
        }

    def aggregate(self, figures: list[dict[str, float]]) -> dict[str, float]:
        tokens = sum(f["answer_tokens"] for f in figures)
        return {
            "accuracy": sum(f["correct"] for f in figures) / len(figures),
            "answer_token_accuracy": sum(f["answer_tokens_right"] for f in figures) / max(tokens, 1.0),
        }


def answer_tokens_right(model, cache: Any, last_prompt_token: int, answer_ids: list[int]) -> int:
    """How many leading answer tokens greedy decoding reproduces after `cache` (the prompt but its last token).

    The prompt's last token and the answer (teacher-forced) are attended as rows after the cache in one
    pass; each row selects its own tokens from its whole past as its decode step would, so the leading
    argmax matches are exactly the tokens greedy decoding emits before its first mistake.
    """
    device = next(model.parameters()).device
    rows = torch.tensor([[last_prompt_token] + answer_ids[:-1]], device=device)
    predicted = model(input_ids=rows, past_key_values=cache, use_cache=True).logits[0].argmax(dim=-1).tolist()
    right = 0
    while right < len(answer_ids) and predicted[right] == answer_ids[right]:
        right += 1
    return right


def greedy_answer_tokens_right(model, prompt_ids: list[int], answer_ids: list[int], device: torch.device) -> int:
    """How many leading answer tokens greedy decoding reproduces (prefill all but the prompt's last token)."""
    prefix = torch.tensor([prompt_ids[:-1]], device=device)
    cache = model(input_ids=prefix, use_cache=True).past_key_values
    feed = [prompt_ids[-1]] + answer_ids[:-1]
    for step, (token, target) in enumerate(zip(feed, answer_ids)):
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if int(out.logits[0, -1].argmax()) != target:
            return step
    return len(answer_ids)


class KVRetrievalTask(RetrievalTask):
    """LongEval-style line retrieval: a record of `line <key>: REGISTER_CONTENT is <n>` lines, then a question."""

    name = "kv_retrieval"
    synthetic_task = "kv"

    def texts(self, tokenizer, seed: int) -> list[tuple[str, str]]:
        if self.num_lines is None:
            return super().texts(tokenizer, seed)
        from ..data import synthetic

        rng = random.Random(seed)
        return [synthetic.kv_retrieval_prompt(rng, self.num_lines) for _ in range(self.num_samples_wanted)]


class PasskeyTask(RetrievalTask):
    """Passkey retrieval: a 5-digit key hidden at a random depth in filler text."""

    name = "passkey"
    synthetic_task = "passkey"

    def __init__(self, num_samples: int = 20, context_length: int = 1024) -> None:
        # Its prompts are sized in tokens only: kv_retrieval's num_lines is not an option of this task.
        super().__init__(num_samples, context_length)


class NeedleTask(RetrievalTask):
    """Needles in real prose: `num_needles` people's magic numbers in held-out Python help text, one asked.

    The asked needle's depth cycles through `DEPTHS` over the samples; accuracy per depth is reported too.
    """

    name = "needle"
    DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(
        self,
        num_samples: int = 20,
        context_length: int = 1024,
        num_needles: int = 3,
        haystack: str = "pydoc-topics:heldout",
    ) -> None:
        super().__init__(num_samples, context_length)
        if num_needles < 1:
            raise ValueError(f"needle: num_needles must be >= 1, got {num_needles}")
        self.num_needles, self.haystack = num_needles, haystack

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "num_needles": self.num_needles,
            "haystack": self.haystack,
            "depths": list(self.DEPTHS),
        }

    def texts(self, tokenizer, seed: int) -> list[tuple[str, str]]:
        from ..data.needles import needle_prompt
        from .perplexity import load_text

        text, _ = load_text(self.haystack)
        haystack_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rng = random.Random(seed)
        return [
            needle_prompt(
                rng, tokenizer, haystack_ids, self.context_length, self.num_needles, self.DEPTHS[i % len(self.DEPTHS)]
            )
            for i in range(self.num_samples_wanted)
        ]

    def evaluate_sample(self, model, index: int, cache: Any = None) -> dict[str, float]:
        return {**super().evaluate_sample(model, index, cache), "depth": self.DEPTHS[index % len(self.DEPTHS)]}

    def aggregate(self, figures: list[dict[str, float]]) -> dict[str, float]:
        result = super().aggregate(figures)
        for depth in self.DEPTHS:
            at_depth = [f["correct"] for f in figures if f.get("depth") == depth]
            if at_depth:
                result[f"accuracy_at_depth_{depth}"] = sum(at_depth) / len(at_depth)
        return result

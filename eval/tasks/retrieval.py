"""Synthetic retrieval tasks (LongEval-style key-value lines, passkey), scored by greedy decoding.

Each prompt is prefilled densely except its last token; the answer is then decoded greedily one
token at a time, teacher-forced on the correct prefix, so every answer token comes from a sparse
decode step (a prefill's last row would be dense). A prompt counts as correct when every answer
token is the argmax; decoding stops at the first wrong token, exactly as greedy generation would.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from .base import Task


class RetrievalTask(Task):
    """Accuracy of greedy answers over `num_samples` seeded prompts of about `context_length` tokens."""

    metric = "accuracy"
    synthetic_task = ""

    def __init__(self, num_samples: int = 20, context_length: int = 1024, num_lines: Optional[int] = None) -> None:
        if num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {num_samples}")
        if num_lines is None and context_length < 64:
            raise ValueError(f"{self.name}: context_length must be >= 64 tokens, got {context_length}")
        self.num_samples, self.context_length, self.num_lines = num_samples, context_length, num_lines
        self.samples: list[tuple[list[int], list[int]]] = []
        self.seed: Optional[int] = None

    def settings(self) -> dict[str, Any]:
        lengths = [len(p) for p, _ in self.samples]
        return {
            "num_samples": self.num_samples,
            "context_length": None if self.num_lines else self.context_length,
            "num_lines": self.num_lines,
            "seed": self.seed,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)} if lengths else None,
        }

    def texts(self, tokenizer, seed: int) -> list[tuple[str, str]]:
        """(prompt, answer) texts from `seed`."""
        from ..data import synthetic

        return synthetic.retrieval_prompts(self.synthetic_task, tokenizer, self.context_length, self.num_samples, seed)

    def prepare(self, tokenizer, seed: int) -> None:
        self.seed = seed
        self.samples = []
        for prompt, answer in self.texts(tokenizer, seed):
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.samples.append((prompt_ids, answer_ids))

    @torch.no_grad()
    def evaluate(self, model, tokenizer, progress: bool = False) -> dict[str, float]:
        if not self.samples:
            raise ValueError("call prepare(tokenizer, seed) before evaluate")
        device = next(model.parameters()).device
        correct, answer_tokens_right = 0, 0
        for prompt_ids, answer_ids in self.samples:
            right = greedy_answer_tokens_right(model, prompt_ids, answer_ids, device)
            correct += right == len(answer_ids)
            answer_tokens_right += right
        total_tokens = sum(len(a) for _, a in self.samples)
        return {
            "accuracy": correct / len(self.samples),
            "answer_token_accuracy": answer_tokens_right / max(total_tokens, 1),
        }


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
        return [synthetic.kv_retrieval_prompt(rng, self.num_lines) for _ in range(self.num_samples)]


class PasskeyTask(RetrievalTask):
    """Passkey retrieval: a 5-digit key hidden at a random depth in filler text."""

    name = "passkey"
    synthetic_task = "passkey"

    def __init__(self, num_samples: int = 20, context_length: int = 1024) -> None:
        # Its prompts are sized in tokens only: kv_retrieval's num_lines is not an option of this task.
        super().__init__(num_samples, context_length)

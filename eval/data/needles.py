"""Needles in real prose: sentences giving a person's "special magic number", hidden in English text.

The haystack is a stretch of the held-out Python help topics (`pydoc-topics:heldout`, prose every CPython
ships), starting at a seeded offset. `num_needles` needle sentences about distinct people are put at
sentence boundaries: the one asked about at relative depth `depth`, the others at random depths; the
question closes the prompt, and the answer is the asked person's five-digit number.
"""

from __future__ import annotations

import random
from typing import Any

NEEDLE_NAMES: tuple[str, ...] = (
    "Alice",
    "Bruno",
    "Chen",
    "Dmitri",
    "Elena",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Julia",
    "Kenji",
    "Lucia",
    "Marek",
    "Nadia",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Stefan",
    "Tariq",
    "Ursula",
    "Victor",
    "Wanda",
    "Yusuf",
)
NEEDLE_PREAMBLE = (
    "Read the text below. Some of its sentences give the special magic number of a person: remember them, "
    "a question follows the text.\n\n"
)


def needle_sentence(name: str, number: int) -> str:
    """The sentence that hides one needle."""
    return f"The special magic number for {name} is {number}. "


def needle_question(name: str) -> str:
    """The question closing a prompt; the answer follows it directly."""
    return (
        f"\n\nQuestion: What is the special magic number for {name}?\nAnswer: The special magic number for {name} is "
    )


def needle_prompt(
    rng: random.Random, tokenizer: Any, haystack_ids: list[int], context_tokens: int, num_needles: int, depth: float
) -> tuple[str, str]:
    """(prompt, answer) of about `context_tokens` tokens: `num_needles` needles in prose, the asked one at `depth`."""
    if not 1 <= num_needles <= len(NEEDLE_NAMES):
        raise ValueError(f"num_needles must lie in [1, {len(NEEDLE_NAMES)}], got {num_needles}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must lie in [0, 1], got {depth}")
    names = rng.sample(NEEDLE_NAMES, num_needles)
    numbers = [rng.randint(10000, 99999) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    fixed = NEEDLE_PREAMBLE + "".join(needle_sentence(n, x) for n, x in zip(names, numbers)) + needle_question(names[0])
    body_tokens = context_tokens - len(tokenizer(fixed)["input_ids"])
    if body_tokens < 16:
        raise ValueError(f"a needle prompt of {context_tokens} tokens leaves no room for prose: ask for more tokens")
    if body_tokens > len(haystack_ids):
        raise ValueError(f"the haystack holds {len(haystack_ids)} tokens, fewer than the {body_tokens} asked for")
    start = rng.randrange(0, len(haystack_ids) - body_tokens + 1)
    body = tokenizer.decode(haystack_ids[start : start + body_tokens])
    pieces, last = [], 0
    for where, name, number in sorted(zip(depths, names, numbers)):
        cut = _sentence_boundary(body, max(last, int(where * len(body))))
        pieces += [body[last:cut], needle_sentence(name, number)]
        last = cut
    pieces.append(body[last:])
    return NEEDLE_PREAMBLE + "".join(pieces) + needle_question(names[0]), str(numbers[0])


def _sentence_boundary(text: str, position: int) -> int:
    """The start of the sentence at or after `position` (after ". " or a blank line), or the end of the text."""
    candidates = [
        found + width for mark, width in ((". ", 2), ("\n\n", 2)) if (found := text.find(mark, position)) >= 0
    ]
    return min(candidates) if candidates else len(text)

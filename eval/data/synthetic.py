"""Seeded generators of the synthetic long-context retrieval tasks, and their dense scoring.

Two tasks, both answered by copying a number from far back in the context:

- key-value line retrieval in the LongEval style: a record of lines
  ``line <word-word>: REGISTER_CONTENT is <number>``, then a question about one line;
- passkey retrieval: filler sentences with one passkey sentence hidden at some depth, then a question.

A document is a list of ``(text, is_answer)`` segments so that training can weight answer tokens;
a prompt is the text before the first answer and the answer itself. The segment boundaries fall where
the tokenizer's pre-tokenizer splits anyway (digits are isolated), so encoding segment by segment
gives the same ids as encoding the joined text.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence, Union

import torch

RngOrSeed = Union[random.Random, int]
Segments = list[tuple[str, bool]]

# Short, common words: each is one or two BPE tokens, so a line key is a handful of tokens.
KEY_WORDS: tuple[str, ...] = (
    "apple",
    "arrow",
    "amber",
    "anchor",
    "badge",
    "basin",
    "beach",
    "berry",
    "blade",
    "bloom",
    "board",
    "bonus",
    "brave",
    "brick",
    "brook",
    "cabin",
    "candy",
    "cargo",
    "cedar",
    "chalk",
    "charm",
    "chess",
    "cider",
    "cliff",
    "cloud",
    "coral",
    "crane",
    "crisp",
    "crown",
    "daisy",
    "delta",
    "denim",
    "diner",
    "draft",
    "dream",
    "eagle",
    "ember",
    "fable",
    "feast",
    "fern",
    "field",
    "flame",
    "flint",
    "flute",
    "frost",
    "gamma",
    "giant",
    "glade",
    "globe",
    "grape",
    "grove",
    "harbor",
    "hazel",
    "heron",
    "honey",
    "ivory",
    "jelly",
    "jewel",
    "kayak",
    "kiosk",
    "lemon",
    "lilac",
    "lunar",
    "maple",
    "marsh",
    "melon",
    "mint",
    "moose",
    "noble",
    "north",
    "oasis",
    "olive",
    "onion",
    "opal",
    "orbit",
    "otter",
    "panda",
    "pearl",
    "pepper",
    "piano",
    "pilot",
    "plaza",
    "plum",
    "polar",
    "prism",
    "quartz",
    "quiet",
    "radar",
    "raven",
    "reef",
    "ridge",
    "river",
    "robin",
    "rocket",
    "royal",
    "ruby",
    "saddle",
    "salmon",
    "sandy",
    "scout",
    "shell",
    "silver",
    "slate",
    "solar",
    "spice",
    "spring",
    "storm",
    "sugar",
    "swift",
    "tango",
    "thorn",
    "tiger",
    "topaz",
    "torch",
    "tulip",
    "umber",
    "valley",
    "velvet",
    "violet",
    "walnut",
    "whale",
    "willow",
    "winter",
    "zebra",
)

KV_PREAMBLE = (
    "Below is a record of lines. Each line has a key and a REGISTER_CONTENT. "
    "Remember the REGISTER_CONTENT of every line; a question follows the record.\n\n"
)

PASSKEY_PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def as_rng(rng_or_seed: RngOrSeed) -> random.Random:
    """Return the given Random, or a new Random seeded with the given int."""
    return rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)


def _kv_record(rng: random.Random, num_lines: int) -> tuple[list[str], list[int]]:
    """`num_lines` distinct word-word keys and their five-digit values."""
    all_pairs = len(KEY_WORDS) * (len(KEY_WORDS) - 1)
    if not 1 <= num_lines <= all_pairs:
        raise ValueError(f"num_lines must lie in [1, {all_pairs}] (the distinct keys), got {num_lines}")
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < num_lines:
        first, second = rng.sample(KEY_WORDS, 2)
        key = f"{first}-{second}"
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys, [rng.randint(10000, 99999) for _ in keys]


def kv_retrieval_document(rng_or_seed: RngOrSeed, num_lines: int = 60, num_queries: int = 1) -> Segments:
    """A LongEval-style line record and `num_queries` questions about distinct lines, as segments."""
    if num_lines < 1 or not 1 <= num_queries <= num_lines:
        raise ValueError(f"need num_lines >= 1 and 1 <= num_queries <= num_lines, got {num_lines}, {num_queries}")
    rng = as_rng(rng_or_seed)
    keys, values = _kv_record(rng, num_lines)
    asked = rng.sample(range(num_lines), num_queries)
    leads = [
        f"\nQuestion: what is the REGISTER_CONTENT in line {keys[i]}?\nAnswer: line {keys[i]}: REGISTER_CONTENT is <"
        for i in asked
    ]
    return _answered(_record_text(keys, values), leads, [values[i] for i in asked])


def kv_recall_document(rng_or_seed: RngOrSeed, num_lines: int = 16) -> Segments:
    """A LongEval-style line record, then every line restated in a shuffled order with its value as the answer.

    Training data: each restated line asks for one key-to-value match, so a record of n lines gives n
    matching signals at the cost of one line each (a question costs two), and a model has to look
    the key up: the order differs from the record's.
    """
    rng = as_rng(rng_or_seed)
    keys, values = _kv_record(rng, num_lines)
    order = rng.sample(range(num_lines), num_lines)
    leads = [f"line {keys[i]}: REGISTER_CONTENT is <" for i in order]
    leads[0] = "\nThe same lines again:\n" + leads[0]
    return _answered(_record_text(keys, values), leads, [values[i] for i in order])


def _record_text(keys: list[str], values: list[int]) -> str:
    return KV_PREAMBLE + "".join(f"line {key}: REGISTER_CONTENT is <{value}>\n" for key, value in zip(keys, values))


def _answered(record: str, leads: list[str], answers: list[int]) -> Segments:
    # record, then for each answer: its lead-in text, the answer (marked), and the closing ">\n".
    segments: Segments = []
    prefix = record
    for lead, answer in zip(leads, answers):
        segments.append((prefix + lead, False))
        segments.append((str(answer), True))
        prefix = ">\n"
    segments.append((prefix, False))
    return segments


def passkey_document(rng_or_seed: RngOrSeed, num_filler_sentences: int = 100, depth: float | None = None) -> Segments:
    """Filler sentences with a passkey sentence at relative `depth` (random if None), then the question."""
    if num_filler_sentences < 0:
        raise ValueError(f"num_filler_sentences must be >= 0, got {num_filler_sentences}")
    rng = as_rng(rng_or_seed)
    passkey = rng.randint(10000, 99999)
    where = rng.random() if depth is None else depth
    if not 0.0 <= where <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(num_filler_sentences)]
    split = round(where * num_filler_sentences)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    body = " ".join(filler[:split] + [needle] + filler[split:])
    prompt = PASSKEY_PREAMBLE + body + "\nWhat is the pass key? The pass key is "
    return [(prompt, False), (str(passkey), True), (".\n", False)]


def prompt_and_answer(segments: Segments) -> tuple[str, str]:
    """The text before the first answer segment, and that answer."""
    prompt = ""
    for text, is_answer in segments:
        if is_answer:
            return prompt, text
        prompt += text
    raise ValueError("document has no answer segment")


def kv_retrieval_prompt(rng_or_seed: RngOrSeed, num_lines: int = 60) -> tuple[str, str]:
    """One key-value retrieval prompt over `num_lines` lines: (prompt_text, answer_text)."""
    return prompt_and_answer(kv_retrieval_document(rng_or_seed, num_lines, 1))


def passkey_prompt(
    rng_or_seed: RngOrSeed, num_filler_sentences: int = 100, depth: float | None = None
) -> tuple[str, str]:
    """One passkey prompt: (prompt_text, answer_text)."""
    return prompt_and_answer(passkey_document(rng_or_seed, num_filler_sentences, depth))


def count_tokens(tokenizer, text: str) -> int:
    """Token count of `text` as the model sees it (with the tokenizer's special tokens)."""
    return len(tokenizer(text)["input_ids"])


def document_to_length(
    make_document: Callable[[random.Random, int], Segments],
    tokenizer,
    target_tokens: int,
    rng_or_seed: RngOrSeed,
    min_size: int = 1,
) -> Segments:
    """The largest document `make_document(rng, size)` whose tokens (with special tokens) fit `target_tokens`.

    One sub-seed is drawn from the rng, so every candidate size sees the same random stream and the
    result is a function of the seed alone.
    """
    sub_seed = as_rng(rng_or_seed).getrandbits(63)

    def length(size: int) -> int:
        return count_tokens(tokenizer, "".join(text for text, _ in make_document(random.Random(sub_seed), size)))

    if length(min_size) > target_tokens:
        raise ValueError(f"even the smallest document exceeds {target_tokens} tokens")
    low, high = min_size, max(1, 2 * min_size)
    while length(high) <= target_tokens:  # exponential search for an upper bound
        low, high = high, high * 2
    while high - low > 1:  # invariant: length(low) fits, length(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if length(middle) <= target_tokens else (low, middle)
    return make_document(random.Random(sub_seed), low)


def kv_retrieval_prompt_to_length(tokenizer, target_tokens: int, rng_or_seed: RngOrSeed) -> tuple[str, str]:
    """A key-value retrieval prompt with as many lines as fit `target_tokens` prompt tokens."""
    segments = document_to_length(
        lambda rng, n: kv_retrieval_document(rng, n, 1), tokenizer, target_tokens, rng_or_seed
    )
    return prompt_and_answer(segments)


def passkey_prompt_to_length(tokenizer, target_tokens: int, rng_or_seed: RngOrSeed) -> tuple[str, str]:
    """A passkey prompt with as much filler as fits `target_tokens` prompt tokens."""
    segments = document_to_length(lambda rng, n: passkey_document(rng, n), tokenizer, target_tokens, rng_or_seed, 0)
    return prompt_and_answer(segments)


def retrieval_prompts(task: str, tokenizer, target_tokens: int, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` prompts of task "kv" or "passkey", each about `target_tokens` tokens long, from `seed`."""
    builders = {"kv": kv_retrieval_prompt_to_length, "passkey": passkey_prompt_to_length}
    if task not in builders:
        raise ValueError(f"task must be one of {sorted(builders)}, got {task!r}")
    rng = random.Random(seed)
    return [builders[task](tokenizer, target_tokens, rng) for _ in range(count)]


@torch.no_grad()
def greedy_answer_correct(model, tokenizer, samples: Sequence[tuple[str, str]], batch_size: int = 8) -> list[bool]:
    """Whether greedy decoding of each prompt reproduces its answer tokens exactly.

    Teacher-forced in one forward pass per batch: greedy decoding emits the answer if and only if the
    argmax at every answer position, given the correct answer prefix, is the next answer token.
    Prompts are right-padded, which a causal model never attends to from earlier positions.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct: list[bool] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        rows, spans = [], []
        for prompt, answer in batch:
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows.append(prompt_ids + answer_ids)
            spans.append((len(prompt_ids), len(answer_ids)))
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
        logits = model(input_ids=input_ids.to(device)).logits
        predicted = logits.argmax(dim=-1).cpu()
        for i, (prompt_length, answer_length) in enumerate(spans):
            targets = input_ids[i, prompt_length : prompt_length + answer_length]
            guesses = predicted[i, prompt_length - 1 : prompt_length - 1 + answer_length]
            correct.append(bool(torch.equal(targets, guesses)))
    return correct


def greedy_answer_accuracy(model, tokenizer, samples: Sequence[tuple[str, str]], batch_size: int = 8) -> float:
    """Fraction of prompts whose answer greedy decoding reproduces exactly."""
    outcomes = greedy_answer_correct(model, tokenizer, samples, batch_size)
    return sum(outcomes) / max(len(outcomes), 1)

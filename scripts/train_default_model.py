#!/usr/bin/env python
"""Train the small Llama-architecture model bundled as doublesparse's default model.

Data that exists wherever Python runs: the standard library's *.py sources, split by a hash of the
relative path into train / calibration / held-out parts, mixed with synthetic long-context retrieval
documents (LongEval-style key-value lines and passkey documents from `doublesparse.eval.data.synthetic`).
A byte-level BPE tokenizer is trained first; the model then trains with a context-length curriculum
(short first, so the retrieval circuit forms cheaply, then longer). The best checkpoint by a fixed
validation score is written periodically into the output folder, so an interrupted run still leaves
a usable model; at the end the shipped (fp16) weights are evaluated and the model card is written.

Smoke test: python scripts/train_default_model.py --out-dir /tmp/m --steps 3 --hidden-size 32 ...
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import processors
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from doublesparse.eval.data import synthetic
from doublesparse.eval.data.bpe import train_byte_level_bpe

LOGGER = logging.getLogger("train_default_model")
BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPLIT_TRAIN_PERCENT = 90  # hash buckets 0..89 train, 90..94 calibration, 95..99 held-out
SPLIT_CALIBRATION_PERCENT = 95
ASSET_TEXT_BYTES = 900_000  # calibration.txt / heldout.txt stay under 1 MB
# Seeds of the synthetic data streams, offset from --seed so train, validation and final test differ.
VALIDATION_SEED_OFFSET = 1_000_003
FINAL_EVAL_SEED_OFFSET = 2_000_003


@dataclass
class TrainArgs:
    """Every setting of a run (recorded in training_summary.json)."""

    out_dir: str
    seed: int
    steps: int
    context_lengths: list[int]
    stage_fractions: list[float]
    batch_tokens: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    answer_loss_weight: float
    synthetic_context_weight: float
    first_answer_weight: float
    mix_kv: float
    mix_recall: float
    mix_passkey: float
    mix_text: float
    mix_copy: float
    short_document_share: float
    max_questions: int
    eval_every: int
    eval_samples: int
    eval_text_tokens: int
    final_eval_samples: int
    final_eval_text_tokens: int
    tokenizer_chars: int
    max_train_chars: int
    device: str
    threads: int
    evaluate_only: bool
    card_only: bool = False


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse the command line into a TrainArgs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="doublesparse/assets/default_model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="optimizer steps (3000 fit about an hour on two CPU cores; more help the long contexts)",
    )
    parser.add_argument("--context-lengths", default="256,512,1024,2048", help="curriculum stages, comma-separated")
    parser.add_argument("--stage-fractions", default="0.3,0.25,0.25,0.2", help="share of steps per stage")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--answer-loss-weight", type=float, default=1.0, help="weight of the answer-token loss term")
    parser.add_argument(
        "--synthetic-context-weight",
        type=float,
        default=0.25,
        help="loss weight of non-answer tokens of synthetic documents (mostly random digits)",
    )
    parser.add_argument(
        "--first-answer-weight",
        type=float,
        default=3.0,
        help="extra loss weight of the first token of each answer (where the line is looked up)",
    )
    parser.add_argument(
        "--mix",
        default="0.25,0.25,0.15,0.2,0.15",
        help="shares of kv (questions), kv recall (restated lines), passkey, stdlib-text and copy documents",
    )
    parser.add_argument(
        "--short-document-share",
        type=float,
        default=0.5,
        help="share of documents sized at random below the room left in the row (the rest fill it)",
    )
    parser.add_argument("--max-questions", type=int, default=16, help="most questions per key-value document")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-text-tokens", type=int, default=8192)
    parser.add_argument("--final-eval-samples", type=int, default=100)
    parser.add_argument("--final-eval-text-tokens", type=int, default=131072)
    parser.add_argument("--tokenizer-chars", type=int, default=4_000_000)
    parser.add_argument("--max-train-chars", type=int, default=16_000_000)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the checkpoint in --out-dir and rewrite metrics and model card",
    )
    parser.add_argument(
        "--card-only",
        action="store_true",
        help="rewrite MODEL_CARD.md in --out-dir from its recorded summary and metrics (no training, no evaluation)",
    )
    raw = parser.parse_args(argv)
    mix = [float(x) for x in raw.mix.split(",")]
    if len(mix) != 5 or min(mix) < 0 or sum(mix) <= 0:
        parser.error("--mix needs five non-negative shares: kv, recall, passkey, text, copy")
    args = TrainArgs(
        out_dir=raw.out_dir,
        seed=raw.seed,
        steps=raw.steps,
        context_lengths=[int(x) for x in raw.context_lengths.split(",")],
        stage_fractions=[float(x) for x in raw.stage_fractions.split(",")],
        batch_tokens=raw.batch_tokens,
        num_layers=raw.num_layers,
        hidden_size=raw.hidden_size,
        intermediate_size=raw.intermediate_size,
        num_heads=raw.num_heads,
        num_kv_heads=raw.num_kv_heads,
        head_dim=raw.head_dim,
        vocab_size=raw.vocab_size,
        learning_rate=raw.learning_rate,
        warmup_steps=raw.warmup_steps,
        weight_decay=raw.weight_decay,
        answer_loss_weight=raw.answer_loss_weight,
        synthetic_context_weight=raw.synthetic_context_weight,
        mix_kv=mix[0],
        mix_recall=mix[1],
        mix_passkey=mix[2],
        mix_text=mix[3],
        mix_copy=mix[4],
        first_answer_weight=raw.first_answer_weight,
        short_document_share=raw.short_document_share,
        max_questions=raw.max_questions,
        eval_every=raw.eval_every,
        eval_samples=raw.eval_samples,
        eval_text_tokens=raw.eval_text_tokens,
        final_eval_samples=raw.final_eval_samples,
        final_eval_text_tokens=raw.final_eval_text_tokens,
        tokenizer_chars=raw.tokenizer_chars,
        max_train_chars=raw.max_train_chars,
        device=raw.device,
        threads=raw.threads,
        evaluate_only=raw.evaluate_only,
        card_only=raw.card_only,
    )
    if len(args.context_lengths) != len(args.stage_fractions) or abs(sum(args.stage_fractions) - 1) > 1e-6:
        parser.error("--stage-fractions needs one share per context length, summing to 1")
    if any(args.batch_tokens < length for length in args.context_lengths):
        parser.error("--batch-tokens must be at least the longest context length")
    return args


# ----------------------------------------------------------------------------- data: the stdlib split


def stdlib_sources() -> tuple[Path, list[str]]:
    """The stdlib folder and its *.py files (relative POSIX paths, sorted), third-party folders excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in excluded]  # prune, do not descend
        relative_folder = Path(folder).relative_to(root)
        files += [(relative_folder / name).as_posix() for name in names if name.endswith(".py")]
    return root, sorted(files)


def split_of(relative_path: str) -> str:
    """'train', 'calibration' or 'heldout', from a hash of the relative path (stable across machines)."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_TRAIN_PERCENT:
        return "train"
    return "calibration" if bucket < SPLIT_CALIBRATION_PERCENT else "heldout"


def read_split(root: Path, files: list[str], split: str, max_chars: int) -> list[str]:
    """Texts of the split's files in sorted order, whole files only, at most `max_chars` in all."""
    texts, total = [], 0
    for relative in files:
        if split_of(relative) != split:
            continue
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_chars:
            continue  # skip a file that does not fit; a later, smaller one may
        texts.append(text)
        total += len(text)
    return texts


def asset_text(root: Path, files: list[str], split: str) -> str:
    """The calibration or held-out text shipped with the model: whole files, under ASSET_TEXT_BYTES bytes."""
    pieces, total = [], 0
    for text in read_split(root, files, split, 10 * ASSET_TEXT_BYTES):
        size = len(text.encode("utf-8")) + 2
        if total + size > ASSET_TEXT_BYTES:
            continue
        pieces.append(text)
        total += size
    return "\n\n".join(pieces)


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (digits split one by one) trained on `texts` plus synthetic documents."""
    synthetic_texts = [
        "".join(text for text, _ in synthetic.kv_retrieval_document(seed * 7919 + i, 30, 2)) for i in range(200)
    ] + ["".join(text for text, _ in synthetic.passkey_document(seed * 7919 + i, 40)) for i in range(50)]
    tokenizer = train_byte_level_bpe(texts + synthetic_texts, vocab_size, [BOS_TOKEN, PAD_TOKEN])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Every sequence starts with BOS, in training and at inference: a stable attention sink.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 20,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each text preceded by BOS."""
    encoded = tokenizer(texts)["input_ids"]
    return torch.tensor([token for ids in encoded for token in ids], dtype=torch.int32)


# ----------------------------------------------------------------------------- batches


def encode_segments(tokenizer: PreTrainedTokenizerFast, segments: synthetic.Segments) -> tuple[list[int], list[bool]]:
    """BOS plus the ids of each segment, and which ids belong to answers."""
    ids, is_answer = [tokenizer.bos_token_id], [False]
    for text, answer in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        is_answer += [answer] * len(piece)
    return ids, is_answer


# Tokens of one key-value line and of one question with its answer (about 16 and 36 with the trained
# tokenizer); used only to size documents, which are cut at the row's end anyway.
KV_LINE_TOKENS = 16
KV_QUESTION_TOKENS = 36
PASSKEY_SENTENCE_TOKENS = 5
MIN_PIECE_TOKENS = 32


@dataclass
class Piece:
    """One document of a packed row: ids, per-token loss weights, and which ids are retrieval answers."""

    ids: list[int]
    weights: list[float]
    answers: list[bool]


def answer_weights(is_answer: list[bool], args: TrainArgs) -> list[float]:
    """Loss weights of a synthetic document: answers 1, the first digit of each answer more, the rest less.

    The first digit is where the model has to find the right line (the later digits continue a
    copy it has already started), so it carries the signal that teaches matching a key.
    """
    weights = [1.0 if answer else args.synthetic_context_weight for answer in is_answer]
    for index in range(1, len(is_answer)):
        if is_answer[index] and not is_answer[index - 1]:
            weights[index] += args.first_answer_weight
    return weights


def kv_piece(rng: random.Random, args: TrainArgs, tokenizer: PreTrainedTokenizerFast, tokens: int) -> Piece:
    """A key-value document of about `tokens` tokens: a record, then questions about distinct lines."""
    questions = max(1, min(args.max_questions, tokens // (KV_QUESTION_TOKENS + 3 * KV_LINE_TOKENS)))
    lines = max(questions, (tokens - questions * KV_QUESTION_TOKENS - 40) // KV_LINE_TOKENS)
    ids, is_answer = encode_segments(tokenizer, synthetic.kv_retrieval_document(rng, lines, questions))
    return Piece(ids, answer_weights(is_answer, args), is_answer)


def recall_piece(rng: random.Random, args: TrainArgs, tokenizer: PreTrainedTokenizerFast, tokens: int) -> Piece:
    """A key-value record of about `tokens` tokens, then every line restated in a shuffled order."""
    lines = max(1, (tokens - 50) // (2 * KV_LINE_TOKENS))
    ids, is_answer = encode_segments(tokenizer, synthetic.kv_recall_document(rng, lines))
    return Piece(ids, answer_weights(is_answer, args), is_answer)


def passkey_piece(rng: random.Random, args: TrainArgs, tokenizer: PreTrainedTokenizerFast, tokens: int) -> Piece:
    """A passkey document of about `tokens` tokens."""
    sentences = max(0, (tokens - 60) // PASSKEY_SENTENCE_TOKENS)
    ids, is_answer = encode_segments(tokenizer, synthetic.passkey_document(rng, sentences))
    return Piece(ids, answer_weights(is_answer, args), is_answer)


def text_piece(rng: random.Random, stream: torch.Tensor, tokens: int, bos_id: int) -> Piece:
    """A random span of the stdlib training stream, after BOS; every token weighs 1."""
    start = rng.randrange(len(stream) - tokens)
    ids = [bos_id] + stream[start : start + tokens - 1].tolist()
    return Piece(ids, [1.0] * len(ids), [False] * len(ids))


def copy_piece(rng: random.Random, stream: torch.Tensor, tokens: int, bos_id: int) -> Piece:
    """A span of stdlib tokens, then the same span again; only the repeat is weighted.

    The repeat is predictable only by looking back and copying, the cheapest signal that forms
    induction heads; the retrieval documents then only have to teach matching a key. Code repeats
    short tokens often, so copying it needs the longer-prefix matching that keys need too.
    """
    half = max(2, tokens // 2)
    start = rng.randrange(len(stream) - half)
    span = stream[start : start + half - 1].tolist()
    ids = [bos_id] + span + [bos_id] + span
    return Piece(ids, [0.0] * half + [1.0] * half, [False] * len(ids))


def training_batch(
    rng: random.Random, args: TrainArgs, tokenizer: PreTrainedTokenizerFast, stream: torch.Tensor, context_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids [B, L], per-token loss weights [B, L] and answer mask [B, L] for one step.

    Each row is packed with documents of random kinds (by the mix) and random sizes, from
    MIN_PIECE_TOKENS to the whole row, so every stage trains short (easy) and full-length (hard)
    retrieval; a document cut at the end of a row keeps its first part.
    """
    rows = args.batch_tokens // context_length
    input_ids = torch.full((rows, context_length), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.zeros((rows, context_length))
    answers = torch.zeros((rows, context_length), dtype=torch.bool)
    kinds = ("kv", "recall", "passkey", "text", "copy")
    shares = (args.mix_kv, args.mix_recall, args.mix_passkey, args.mix_text, args.mix_copy)
    for row in range(rows):
        filled = 0
        while context_length - filled >= MIN_PIECE_TOKENS:
            room = context_length - filled
            tokens = rng.randint(MIN_PIECE_TOKENS, room) if rng.random() < args.short_document_share else room
            kind = rng.choices(kinds, weights=shares)[0]
            if kind == "kv":
                piece = kv_piece(rng, args, tokenizer, tokens)
            elif kind == "recall":
                piece = recall_piece(rng, args, tokenizer, tokens)
            elif kind == "passkey":
                piece = passkey_piece(rng, args, tokenizer, tokens)
            elif kind == "text":
                piece = text_piece(rng, stream, tokens, tokenizer.bos_token_id)
            else:
                piece = copy_piece(rng, stream, tokens, tokenizer.bos_token_id)
            count = min(len(piece.ids), room)
            span = slice(filled, filled + count)
            input_ids[row, span] = torch.tensor(piece.ids[:count])
            weights[row, span] = torch.tensor(piece.weights[:count])
            answers[row, span] = torch.tensor(piece.answers[:count])
            filled += count
    return input_ids, weights, answers


def batch_losses(
    model: LlamaForCausalLM, input_ids: torch.Tensor, weights: torch.Tensor, answers: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Weighted language-model loss, answer-token loss, and answer-token argmax accuracy."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    token_loss = token_loss.view_as(targets)
    target_weights, target_answers = weights[:, 1:], answers[:, 1:].float()
    lm_loss = (token_loss * target_weights).sum() / target_weights.sum().clamp_min(1e-6)
    answer_count = target_answers.sum().clamp_min(1.0)
    answer_loss = (token_loss * target_answers).sum() / answer_count
    answer_accuracy = ((logits.argmax(-1) == targets).float() * target_answers).sum() / answer_count
    return {"lm_loss": lm_loss, "answer_loss": answer_loss, "answer_token_accuracy": answer_accuracy.detach()}


def stage_of(step: int, args: TrainArgs) -> int:
    """Index of the curriculum stage that `step` falls in."""
    boundary = 0.0
    for index, fraction in enumerate(args.stage_fractions):
        boundary += fraction * args.steps
        if step < boundary:
            return index
    return len(args.stage_fractions) - 1


def learning_rate_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, tokens: torch.Tensor, window: int, device: torch.device) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream (each window starts fresh)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window].long().unsqueeze(0).to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += chunk.shape[1] - 1
    return total / max(count, 1)


@dataclass
class EvaluationSet:
    """Fixed prompts and held-out tokens that one evaluation scores."""

    kv_short: list[tuple[str, str]]
    kv_long: list[tuple[str, str]]
    passkey_short: list[tuple[str, str]]
    passkey_long: list[tuple[str, str]]
    heldout_tokens: torch.Tensor
    short_length: int
    long_length: int


def evaluation_set(
    tokenizer: PreTrainedTokenizerFast, heldout_text: str, samples: int, text_tokens: int, seed: int, long_length: int
) -> EvaluationSet:
    """Retrieval prompts at ~1K tokens and at the longest trained context, and held-out tokens."""
    short_length = min(1024, long_length)
    # Encode only a prefix: a token is rarely shorter than one character.
    heldout_tokens = encode_stream(tokenizer, [heldout_text[: 16 * text_tokens]])[:text_tokens]
    return EvaluationSet(
        kv_short=synthetic.retrieval_prompts("kv", tokenizer, short_length, samples, seed),
        kv_long=synthetic.retrieval_prompts("kv", tokenizer, long_length, samples, seed + 1),
        passkey_short=synthetic.retrieval_prompts("passkey", tokenizer, short_length, samples, seed + 2),
        passkey_long=synthetic.retrieval_prompts("passkey", tokenizer, long_length, samples, seed + 3),
        heldout_tokens=heldout_tokens,
        short_length=short_length,
        long_length=long_length,
    )


def evaluate(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, data: EvaluationSet, device: torch.device
) -> dict[str, float]:
    """Dense greedy accuracies of the retrieval tasks and the held-out loss / perplexity."""
    model.eval()
    batch = max(1, 8192 // data.long_length)
    metrics = {
        f"kv_accuracy_{data.short_length}": synthetic.greedy_answer_accuracy(model, tokenizer, data.kv_short, batch),
        f"kv_accuracy_{data.long_length}": synthetic.greedy_answer_accuracy(model, tokenizer, data.kv_long, batch),
        f"passkey_accuracy_{data.short_length}": synthetic.greedy_answer_accuracy(
            model, tokenizer, data.passkey_short, batch
        ),
        f"passkey_accuracy_{data.long_length}": synthetic.greedy_answer_accuracy(
            model, tokenizer, data.passkey_long, batch
        ),
    }
    loss = heldout_loss(model, data.heldout_tokens, data.short_length, device)
    metrics["heldout_loss"] = loss
    metrics["heldout_perplexity"] = math.exp(loss)
    model.train()
    return metrics


def validation_score(metrics: dict[str, float]) -> float:
    """One number to pick the best checkpoint: retrieval accuracies first, held-out loss breaks ties."""
    accuracies = sum(value for name, value in metrics.items() if "accuracy" in name)
    return accuracies - 0.01 * metrics["heldout_loss"]


# ----------------------------------------------------------------------------- checkpoints and reports


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write fp16 safetensors weights, configs and tokenizer into `out_dir`, file by file via renames."""
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    half = copy.deepcopy(model).to("cpu", torch.float16)
    half.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, payload: object) -> None:
    """Write JSON atomically."""
    write_text_atomically(path, json.dumps(payload, indent=1) + "\n")


def plot_curves(history: list[dict[str, float]], validations: list[dict[str, float]], path: Path) -> None:
    """Loss curves (train LM and answer loss) and validation accuracies, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [entry["step"] for entry in history]
    left.plot(steps, [entry["lm_loss"] for entry in history], label="train LM loss (weighted)", lw=0.8)
    left.plot(steps, [entry["answer_loss"] for entry in history], label="train answer-token loss", lw=0.8)
    if validations:
        left.plot(
            [v["step"] for v in validations], [v["heldout_loss"] for v in validations], "o-", label="held-out loss"
        )
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.set_yscale("log")
    left.legend()
    for name in sorted({key for v in validations for key in v if "accuracy" in key}):
        right.plot([v["step"] for v in validations], [v.get(name, float("nan")) for v in validations], "o-", label=name)
    right.set_xlabel("step")
    right.set_ylabel("greedy exact-match accuracy (validation)")
    right.set_ylim(-0.02, 1.02)
    right.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name("tmp-" + path.name)
    figure.savefig(temporary, dpi=90)
    plt.close(figure)
    os.replace(temporary, path)


def folder_megabytes(folder: Path) -> float:
    """Size of the model files in `folder` (weights, configs, tokenizer), in MB."""
    names = (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    )
    return sum((folder / name).stat().st_size for name in names if (folder / name).exists()) / 1e6


# The bundled model's accuracy targets (dense, greedy): (metric key pattern, context, minimum).
TARGETS = (("kv_accuracy_{}", "short", 0.9), ("kv_accuracy_{}", "long", 0.7), ("passkey_accuracy_{}", "long", 0.95))


def targets_section(metrics: dict[str, float], short: int, long: int, summary: dict) -> str:
    """The card's table of targets against the measured figures, and what a missed target still needs."""
    lines = ["## Targets", "", "| target | measured | reached |", "|---|---|---|"]
    missed = []
    for pattern, which, minimum in TARGETS:
        context = short if which == "short" else long
        key = pattern.format(context)
        reached = metrics[key] >= minimum
        lines.append(f"| {key} >= {minimum} | {metrics[key]:.3f} | {'yes' if reached else '**no**'} |")
        if not reached:
            missed.append(key)
    if missed:
        steps = f"{summary['steps_done']} steps ({summary['tokens_seen']:,} tokens)"
        lines += [
            "",
            f"Not reached by this run: {', '.join(missed)}. The shipped checkpoint is the best one of a run of "
            f"{steps} on {summary['device_name']}, the most that fitted the time the run had. Retrieval at the "
            "longest context is learnt last, in the final curriculum stage; what it still needs is more steps "
            "at the long stages (a larger `--steps`, or the same recipe on a GPU, where the script runs "
            "unchanged), then `--evaluate-only` to re-measure.",
        ]
    return "\n".join(lines)


def write_model_card(out_dir: Path, args: TrainArgs, summary: dict, metrics: dict[str, float], command: str) -> None:
    """MODEL_CARD.md from the run's recorded summary and the final evaluation of the shipped weights."""
    short, long = min(1024, max(args.context_lengths)), max(args.context_lengths)
    samples = args.final_eval_samples
    params = summary["parameters"]
    card = f"""# doublesparse default model

A small Llama-architecture causal LM trained from scratch on CPU-reachable data, bundled so that
doublesparse has a real model (outlier channels, a working retrieval circuit) with no model hub.
Every number below was written by `{command}` (training, then the final evaluation of the shipped
fp16 weights loaded back in fp32); `--evaluate-only` with the same arguments re-measures them.

## Architecture
- `LlamaForCausalLM`: {args.num_layers} layers, hidden {args.hidden_size}, MLP {args.intermediate_size} (SwiGLU),
  {args.num_heads} query heads and {args.num_kv_heads} KV heads (GQA) of head_dim {args.head_dim}, RoPE, RMSNorm,
  tied embeddings; {params:,} parameters; weights stored in fp16 (safetensors), {folder_megabytes(out_dir):.1f} MB
  with the tokenizer.
- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {summary["vocab_size"]}, digits split one by one,
  `{BOS_TOKEN}` prepended to every sequence (BOS = EOS), `{PAD_TOKEN}` for padding.

## Data
- Python {sys.version.split()[0]} standard library sources (`sysconfig.get_paths()["stdlib"]`, `*.py`, sorted,
  site-packages excluded), split by sha256 of the relative path: buckets 0-89 train, 90-94 calibration,
  95-99 held-out. `calibration.txt` and `heldout.txt` here are whole files of those splits (< 1 MB each).
- Synthetic retrieval documents from `doublesparse.eval.data.synthetic` (training seed {args.seed}; validation and
  the figures below use other seeds): LongEval-style lines `line <word-word>: REGISTER_CONTENT is <number>`
  followed by questions (up to {args.max_questions} per training document), and passkey documents.
- Copy documents (a stdlib span, then the same span again), which form induction heads cheaply.
- Recall documents: a record, then "The same lines again:" and every line restated in a shuffled order,
  its value the answer (one key lookup per restated line).
- Rows are packed with documents: kinds by shares kv questions {args.mix_kv}, kv recall {args.mix_recall},
  passkey {args.mix_passkey}, stdlib text {args.mix_text}, copy {args.mix_copy}; a share
  {args.short_document_share} of the documents is sized at random below the room left in the row, the rest
  fill it. Loss: stdlib tokens weight 1, synthetic non-answer tokens weight {args.synthetic_context_weight},
  answer tokens 1 (the first digit of each answer 1 + {args.first_answer_weight}), plus
  {args.answer_loss_weight} x the mean loss of answer tokens.
- Context curriculum: lengths {args.context_lengths} for shares {args.stage_fractions} of the steps,
  {args.batch_tokens} tokens per step.

## Training
- Steps: {summary["steps_done"]} of {args.steps}; tokens seen: {summary["tokens_seen"]:,}; wall time
  {summary["wall_time_s"] / 60:.1f} min on {summary["device_name"]}.
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak learning rate {args.learning_rate},
  {args.warmup_steps} warm-up steps, cosine decay to a tenth; gradient clipping at 1.0.
- Shipped checkpoint: step {summary["best_step"]} (best validation score).
- Final training losses (mean of the last 20 logged steps): weighted LM loss {summary["final_lm_loss"]:.3f},
  answer-token loss {summary["final_answer_loss"]:.3f}.
- Loss curve: `loss_curve.png`, `loss_curve.json`.

## Evaluation (dense attention, greedy, exact match of the answer number)
Fresh prompts from seed {args.seed + FINAL_EVAL_SEED_OFFSET} (+0..3 per task), {samples} prompts per row.

| task | context (tokens) | accuracy |
|---|---|---|
| kv retrieval | ~{short} | {metrics[f"kv_accuracy_{short}"]:.3f} |
| kv retrieval | ~{long} (longest trained) | {metrics[f"kv_accuracy_{long}"]:.3f} |
| passkey | ~{short} | {metrics[f"passkey_accuracy_{short}"]:.3f} |
| passkey | ~{long} | {metrics[f"passkey_accuracy_{long}"]:.3f} |

Held-out perplexity (stdlib held-out split, first {args.final_eval_text_tokens:,} tokens, windows of {short}):
{metrics["heldout_perplexity"]:.2f} (loss {metrics["heldout_loss"]:.3f} nats/token).

{targets_section(metrics, short, long, summary)}

## Reproduce
```
{command}
```
"""
    write_text_atomically(out_dir / "MODEL_CARD.md", card)


def rewrite_model_card(out_dir: Path) -> None:
    """MODEL_CARD.md again from the run's training_summary.json and metrics.json (card text changes only)."""
    summary = json.loads((out_dir / "training_summary.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    fields = set(TrainArgs.__dataclass_fields__)
    recorded = TrainArgs(**{key: value for key, value in summary["args"].items() if key in fields})
    write_model_card(out_dir, recorded, summary, metrics, metrics["command"])


def pick_device(name: str) -> torch.device:
    """CUDA when asked or when 'auto' finds it, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint(out_dir: Path, device: torch.device) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The saved fp16 checkpoint, loaded back in fp32."""
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    return model, tokenizer


def final_evaluation(args: TrainArgs, out_dir: Path, device: torch.device, heldout_text: str, command: str) -> dict:
    """Evaluate the shipped checkpoint, write metrics.json and MODEL_CARD.md."""
    model, tokenizer = load_checkpoint(out_dir, device)
    data = evaluation_set(
        tokenizer,
        heldout_text,
        args.final_eval_samples,
        args.final_eval_text_tokens,
        args.seed + FINAL_EVAL_SEED_OFFSET,
        max(args.context_lengths),
    )
    metrics = evaluate(model, tokenizer, data, device)
    LOGGER.info("final evaluation: %s", json.dumps(metrics))
    write_json(out_dir / "metrics.json", {"command": command, "samples_per_task": args.final_eval_samples, **metrics})
    summary = json.loads((out_dir / "training_summary.json").read_text())
    curve = json.loads((out_dir / "loss_curve.json").read_text())
    plot_curves(curve["train"], curve["validation"], out_dir / "loss_curve.png")
    write_model_card(out_dir, args, summary, metrics, command)
    return metrics


# ----------------------------------------------------------------------------- main


def train(args: TrainArgs, command: str) -> None:
    """Prepare data and tokenizer, train with the curriculum, checkpoint the best, evaluate, report."""
    out_dir = Path(args.out_dir)
    if args.card_only:
        rewrite_model_card(out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    root, files = stdlib_sources()
    heldout_text = asset_text(root, files, "heldout")
    if args.evaluate_only:
        final_evaluation(args, out_dir, device, heldout_text, command)
        return
    write_text_atomically(out_dir / "calibration.txt", asset_text(root, files, "calibration"))
    write_text_atomically(out_dir / "heldout.txt", heldout_text)

    started = time.time()
    train_texts = read_split(root, files, "train", args.max_train_chars)
    tokenizer = train_tokenizer(read_split(root, files, "train", args.tokenizer_chars), args.vocab_size, args.seed)
    stream = encode_stream(tokenizer, train_texts)
    LOGGER.info(
        "tokenizer %d tokens; train stream %d tokens from %d files (%.0f s)",
        len(tokenizer),
        len(stream),
        len(train_texts),
        time.time() - started,
    )

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, 2 * max(args.context_lengths)),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(device)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    parameters = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
    )
    validation = evaluation_set(
        tokenizer,
        heldout_text,
        args.eval_samples,
        args.eval_text_tokens,
        args.seed + VALIDATION_SEED_OFFSET,
        max(args.context_lengths),
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    data_rng = random.Random(args.seed)
    history: list[dict[str, float]] = []
    validations: list[dict[str, float]] = []
    best_score, best_step, tokens_seen = -math.inf, -1, 0

    def record_summary(steps_done: int) -> None:
        recent = history[-20:]
        write_json(
            out_dir / "training_summary.json",
            {
                "args": asdict(args),
                "command": command,
                "parameters": parameters,
                "vocab_size": len(tokenizer),
                "steps_done": steps_done,
                "tokens_seen": tokens_seen,
                "wall_time_s": time.time() - started,
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"CPU ({torch.get_num_threads()} threads)",
                "best_step": best_step,
                "best_validation": next((v for v in validations if v["step"] == best_step), None),
                "final_lm_loss": sum(e["lm_loss"] for e in recent) / max(len(recent), 1),
                "final_answer_loss": sum(e["answer_loss"] for e in recent) / max(len(recent), 1),
            },
        )
        write_json(out_dir / "loss_curve.json", {"train": history, "validation": validations})

    model.train()
    progress = tqdm(range(args.steps), desc="train", mininterval=5.0 if sys.stderr.isatty() else 60.0)
    for step in progress:
        context_length = args.context_lengths[stage_of(step, args)]
        input_ids, weights, answers = training_batch(data_rng, args, tokenizer, stream, context_length)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args)
        with autocast:
            losses = batch_losses(model, input_ids.to(device), weights.to(device), answers.to(device))
        loss = losses["lm_loss"] + args.answer_loss_weight * losses["answer_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += input_ids.numel()
        entry = {
            "step": step,
            "context_length": context_length,
            "tokens_seen": tokens_seen,
            "lr": optimizer.param_groups[0]["lr"],
            **{name: value.item() for name, value in losses.items()},
        }
        history.append(entry)
        progress.set_postfix(
            L=context_length,
            lm=f"{entry['lm_loss']:.3f}",
            ans=f"{entry['answer_loss']:.3f}",
            acc=f"{entry['answer_token_accuracy']:.2f}",
        )
        last_step = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last_step:
            metrics = evaluate(model, tokenizer, validation, device)
            metrics["step"] = step
            validations.append(metrics)
            score = validation_score(metrics)
            LOGGER.info(
                "step %d (L=%d, %d tokens, %.0f s): %s",
                step,
                context_length,
                tokens_seen,
                time.time() - started,
                json.dumps(metrics),
            )
            # Only checkpoints from the last stage qualify once it starts: earlier ones never saw the
            # longest context, and a lucky early score must not hide the trained model.
            if score > best_score or (
                best_step >= 0
                and stage_of(best_step, args) < stage_of(step, args)
                and stage_of(step, args) == len(args.context_lengths) - 1
            ):
                best_score, best_step = score, step
                save_checkpoint(model, tokenizer, out_dir)
            record_summary(step + 1)
    progress.close()
    record_summary(args.steps)
    final_evaluation(args, out_dir, device, heldout_text, command)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    command = "python scripts/train_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    train(args, command)


if __name__ == "__main__":
    main()

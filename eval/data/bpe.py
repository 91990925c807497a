"""The byte-level BPE tokenizer recipe shared by the bundled model's training and the tiny stand-in model."""

from __future__ import annotations

from typing import Any, Iterable


def train_byte_level_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A `tokenizers.Tokenizer`: byte-level BPE trained on `corpus`, digits split one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits one by one: every number tokenizes the same way wherever it appears, so answers copy
    # digit by digit and segment-wise encoding equals encoding the joined text.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer

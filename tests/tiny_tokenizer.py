"""A character-level tokenizer built locally (no hub): printable ASCII, ids below 128 to fit the tiny models."""

from __future__ import annotations

import string


def tiny_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable character (pad 0, eos 1, bos 2, unk 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for character in string.printable:
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def sample_texts(count: int = 12, seed: int = 0) -> list[str]:
    """`count` short pseudo-English documents, different per seed."""
    import random

    words = "the of and to in is was for on that with as by at from his her an be this which or had are not".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(count)]

"""A tiny random-weight Llama model and a locally trained tokenizer: the stand-in when no trained model is installed.

Its figures say nothing about Double Sparsity (random weights retrieve nothing); it exists so that
the harness, the main job and the tests run end to end anywhere, offline. Everything is built from
a seed, with no download.
"""

from __future__ import annotations

import random
from typing import Any

import torch

TINY_MODEL_NAME = "tiny-random-llama (random weights, NOT a trained model)"


def tiny_tokenizer(vocab_size: int = 512, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer (digits split one by one) trained on synthetic retrieval text (fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from ..data import synthetic
    from ..data.bpe import train_byte_level_bpe

    rng = random.Random(seed)
    corpus = ["".join(text for text, _ in synthetic.kv_retrieval_document(rng, 20)) for _ in range(20)]
    corpus += ["".join(text for text, _ in synthetic.passkey_document(rng, 30)) for _ in range(10)]
    corpus += [
        "def main(argv=None):\n    return 0\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    ]
    tokenizer = train_byte_level_bpe(corpus, vocab_size, ["<|endoftext|>", "<|pad|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def tiny_config(vocab_size: int = 512, num_layers: int = 2, hidden_size: int = 128, head_dim: int = 32) -> Any:
    """The LlamaConfig of the tiny random model (4 query heads, 2 KV heads by default)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=max(1, hidden_size // head_dim // 2),
        head_dim=head_dim,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    config._name_or_path = TINY_MODEL_NAME
    return config


def tiny_random_model(vocab_size: int = 512, seed: int = 0) -> torch.nn.Module:
    """A Llama model with random weights from `seed`, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(tiny_config(vocab_size), attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """(tiny random-weight model, its tokenizer), both from `seed`."""
    tokenizer = tiny_tokenizer(seed=seed)
    return tiny_random_model(len(tokenizer), seed=seed), tokenizer

"""The bundled default model loads offline and retrieves densely at the targets of issue 6."""

from __future__ import annotations

import json

import pytest
import torch

from doublesparse.default_model import default_model_path, load_default_model
from doublesparse.eval.data import synthetic

# Never used by training (seed 0 + offsets) nor by its validation or final evaluation.
TEST_SEED = 424_242
PROMPTS_PER_TASK = 20
SHORT_CONTEXT = 1024


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The bundled model in fp32 on CPU, loaded with the hub switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        model, tokenizer = load_default_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def longest_trained_context() -> int:
    """The longest context of the training curriculum, as recorded by the training run."""
    summary = json.loads((default_model_path() / "training_summary.json").read_text())
    return max(summary["args"]["context_lengths"])


def accuracy(model_and_tokenizer, task: str, context_tokens: int, seed: int) -> float:
    """Dense greedy exact-match accuracy on fresh prompts of one task."""
    model, tokenizer = model_and_tokenizer
    prompts = synthetic.retrieval_prompts(task, tokenizer, context_tokens, PROMPTS_PER_TASK, seed)
    with torch.inference_mode():
        return synthetic.greedy_answer_accuracy(model, tokenizer, prompts, batch_size=max(1, 8192 // context_tokens))


def test_bundle_is_small_and_complete() -> None:
    path = default_model_path()
    model_files = [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in model_files + ["calibration.txt", "heldout.txt", "MODEL_CARD.md"]:
        assert (path / name).is_file(), name
    model_bytes = sum(p.stat().st_size for p in path.iterdir() if p.name not in ("calibration.txt", "heldout.txt"))
    assert model_bytes <= 20_000_000
    assert (path / "calibration.txt").stat().st_size <= 1_000_000
    assert (path / "heldout.txt").stat().st_size <= 1_000_000


def test_plain_auto_classes_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tokenizer("line apple-river: REGISTER_CONTENT is <12345>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "line apple-river: REGISTER_CONTENT is <12345>"


def test_kv_retrieval_at_1k(model_and_tokenizer) -> None:
    assert accuracy(model_and_tokenizer, "kv", SHORT_CONTEXT, TEST_SEED) >= 0.9


def test_kv_retrieval_at_longest_trained_context(model_and_tokenizer, longest_trained_context: int) -> None:
    assert accuracy(model_and_tokenizer, "kv", longest_trained_context, TEST_SEED + 1) >= 0.7


def test_passkey_at_longest_trained_context(model_and_tokenizer, longest_trained_context: int) -> None:
    assert accuracy(model_and_tokenizer, "passkey", longest_trained_context, TEST_SEED + 2) >= 0.95

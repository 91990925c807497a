"""Tasks: retrieval decoding agrees with the teacher-forced dense check, perplexity with a direct loss;
and, on the bundled trained model, oracle >= Double Sparsity >= random channels at 1/16."""

from __future__ import annotations

import math

import pytest
import torch

from doublesparse import SparsityConfig
from doublesparse.eval import methods
from doublesparse.eval.data import synthetic
from doublesparse.eval.models.source import bundled_model_present
from doublesparse.eval.models.tiny_random import tiny_model_and_tokenizer
from doublesparse.eval.tasks import make_task
from doublesparse.eval.tasks.retrieval import greedy_answer_tokens_right


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer(seed=0)


def test_greedy_decoding_agrees_with_teacher_forced_check(tiny):
    model, tokenizer = tiny
    samples = synthetic.retrieval_prompts("kv", tokenizer, 160, 3, seed=1)
    expected = synthetic.greedy_answer_correct(model, tokenizer, samples)
    for (prompt, answer), correct in zip(samples, expected):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            right = greedy_answer_tokens_right(model, prompt_ids, answer_ids, torch.device("cpu"))
        assert (right == len(answer_ids)) == correct
    # A random model gets nothing right: check the success path with the answer it predicts anyway.
    with torch.no_grad():
        predicted = model(input_ids=torch.tensor([tokenizer(samples[0][0])["input_ids"]])).logits[0, -1].argmax()
        prompt_ids = tokenizer(samples[0][0])["input_ids"]
        assert greedy_answer_tokens_right(model, prompt_ids, [int(predicted)], torch.device("cpu")) == 1


def test_perplexity_of_dense_matches_a_direct_loss(tiny):
    model, tokenizer = tiny
    task = make_task("perplexity", window=64, num_windows=2, protocol="every-position")
    task.prepare(tokenizer, seed=0)
    figures = task.evaluate(model, tokenizer)
    with torch.no_grad():
        loss = model(input_ids=task.windows, labels=task.windows).loss
    assert figures["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_continuation_perplexity_of_dense_scores_the_last_tokens_of_each_window(tiny):
    model, tokenizer = tiny
    task = make_task("perplexity", window=64, num_windows=2, continuation=16)
    task.prepare(tokenizer, seed=0)
    assert task.prefix_ids(0).shape == (1, 64 - 16 - 1) and task.settings()["prompt_tokens"] == 48
    figures = task.evaluate(model, tokenizer)
    with torch.no_grad():
        logits = model(input_ids=task.windows).logits[:, -17:-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), task.windows[:, -16:].reshape(-1))
    assert figures["tokens"] == 32 and figures["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_retrieval_task_is_seeded(tiny):
    _, tokenizer = tiny
    first = make_task("kv_retrieval", num_samples=2, num_lines=5)
    second = make_task("kv_retrieval", num_samples=2, num_lines=5)
    first.prepare(tokenizer, seed=3)
    second.prepare(tokenizer, seed=3)
    assert first.samples == second.samples and first.settings()["num_lines"] == 5


@pytest.mark.skipif(
    not bundled_model_present(),
    reason="the bundled trained model is not installed (doublesparse/assets/default_model has no weights)",
)
def test_selection_quality_order_on_the_bundled_model():
    from doublesparse import load_default_model
    from doublesparse.channels import ChannelMask
    from doublesparse.eval.models.channel_masks import calibrate_channels, shipped_mask_path

    model, tokenizer = load_default_model()
    shipped = shipped_mask_path()
    if shipped:
        mask = ChannelMask.load(shipped)
    else:
        mask = calibrate_channels(model, tokenizer, num_samples=8, seq_len=512, progress=False)[0]
    task = make_task("kv_retrieval", num_samples=12, context_length=768)
    task.prepare(tokenizer, seed=11)
    config = SparsityConfig(num_channels=16, token_budget=1 / 16, label_bits=16, sink_tokens=0, recent_tokens=0)
    accuracy = {}
    for name in ("oracle_topk", "double_sparsity", "random_channels"):
        with methods.make_method(name).patch(model, config, mask):
            accuracy[name] = task.evaluate(model, tokenizer)["answer_token_accuracy"]
    assert accuracy["oracle_topk"] >= accuracy["double_sparsity"] >= accuracy["random_channels"], accuracy

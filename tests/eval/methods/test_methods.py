"""The method contract, parametrised over the whole registry: dense when the budget covers the past,
never padding or future tokens, and exactly the budget."""

from __future__ import annotations

import contextlib

import pytest
import torch

import doublesparse.label_attention as ds_attention
from doublesparse import SparsityConfig
from doublesparse.eval import methods
from doublesparse.eval.methods.base import selective_patch
from doublesparse.eval.methods.baselines import QuestMethod
from doublesparse.kernels.sparse_attention import selection_mask

from tiny_models import left_padded_batch, random_channel_mask, tiny_model

LENGTHS = (19, 13)  # left-padded batch: the second row carries 6 padding tokens
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=2)


@pytest.fixture(scope="module")
def channels(model):
    return random_channel_mask(model, seed=1)


@contextlib.contextmanager
def recording(model, method, config, channels):
    """Patch with `method` and collect every selection it makes (dicts of valid, budgets, selected)."""
    records: list = []
    if isinstance(method, methods.SelectiveMethod):
        with selective_patch(model, method, method.effective_config(config), recorder=records):
            yield records
        return
    original = ds_attention.select_tokens

    def recorder(scores, valid, budgets, sink, recent, max_budget, backend="auto", scratch=None):
        indices, slot_valid = original(scores, valid, budgets, sink, recent, max_budget, backend, scratch)
        selected = selection_mask(indices, slot_valid, valid.shape[-1])
        records.append({"valid": valid, "budgets": budgets, "selected": selected})
        return indices, slot_valid

    ds_attention.select_tokens = recorder
    try:
        with method.patch(model, config, channels):
            yield records
    finally:
        ds_attention.select_tokens = original


def teacher_forced_and_decode(model, input_ids, attention_mask, steps=DECODE_STEPS):
    """Logits of a full pass, then of `steps` single-token decode steps after a prefill of all but the last tokens."""
    full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    prefix = input_ids.shape[1] - steps
    out = model(input_ids=input_ids[:, :prefix], attention_mask=attention_mask[:, :prefix], use_cache=True)
    cache, stepped = out.past_key_values, [out.logits[:, -1]]
    for i in range(prefix, input_ids.shape[1]):
        out = model(
            input_ids=input_ids[:, i : i + 1],
            attention_mask=attention_mask[:, : i + 1],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        stepped.append(out.logits[:, -1])
    return full, torch.stack(stepped[:-1], dim=1)


@pytest.mark.parametrize("name", methods.METHOD_NAMES)
def test_full_budget_equals_dense(model, channels, name):
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=3)
    with torch.no_grad():
        dense_full, dense_steps = teacher_forced_and_decode(model, input_ids, attention_mask)
        method = methods.make_method(name)
        # A fraction of 1 in teacher-forced rows, a count above every length while decoding.
        for simulate, budget in ((True, 1.0), (False, 64)):
            config = SparsityConfig(
                num_channels=4, token_budget=budget, simulate=simulate, label_bits=16, sink_tokens=0, recent_tokens=0
            )
            with method.patch(model, config, channels):
                full, steps = teacher_forced_and_decode(model, input_ids, attention_mask)
            real = attention_mask.bool()
            torch.testing.assert_close(full[real], dense_full[real], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(steps, dense_steps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in methods.METHOD_NAMES if n != "dense"])
@pytest.mark.parametrize("budget", [0.25, 5])
def test_selection_contract(model, channels, name, budget):
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=4)
    method = methods.make_method(name)
    config = SparsityConfig(
        num_channels=4, token_budget=budget, sink_tokens=1, recent_tokens=2, simulate=True, label_bits=16
    )
    with torch.no_grad(), recording(model, method, config, channels) as records:
        teacher_forced_and_decode(model, input_ids, attention_mask)
    assert records, f"{name} never selected tokens"
    for record in records:
        valid, budgets, selected = record["valid"], record["budgets"], record["selected"]
        assert not (selected & ~valid[:, None]).any(), f"{name} selected padding or future tokens"
        counts = selected.sum(dim=-1)  # [B, H_select, L]
        rows_with_keys = valid.any(dim=-1)[:, None].expand_as(counts)
        expected = budgets[:, None].expand_as(counts)
        exact = torch.equal(counts[rows_with_keys], expected[rows_with_keys])
        assert exact, f"{name} did not attend exactly its budget"


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="known methods are dense"):
        methods.make_method("h3o")


def test_streaming_llm_keeps_sinks_and_recent(model):
    input_ids, attention_mask = left_padded_batch((24,), seed=5)
    method = methods.make_method("streaming_llm")
    config = SparsityConfig(token_budget=8, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0)
    with torch.no_grad(), recording(model, method, config, None) as records:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    selected = records[0]["selected"][0, 0, -1]
    assert selected.nonzero().flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_quest_takes_whole_pages(model):
    input_ids, attention_mask = left_padded_batch((40,), seed=6)
    method = QuestMethod(page_size=4)
    config = SparsityConfig(token_budget=12, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0)
    with torch.no_grad(), recording(model, method, config, None) as records:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    chosen = records[0]["selected"][0, :, -1]  # [H_select, T], last row: pages 0..9, own page 9
    pages = chosen.view(chosen.shape[0], 10, 4).sum(dim=-1)
    assert ((pages == 0) | (pages == 4)).all() and bool(pages[:, 9].eq(4).all())

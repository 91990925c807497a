"""The preallocated (static) label cache decodes exactly what the growing one does."""

import pytest
import torch

import doublesparse as ds

from tiny_models import left_padded_batch, random_channel_mask, tiny_model


def decode(model, input_ids, attention_mask, cache, steps):
    """Greedy decoding by hand: prefill, then one token per step; returns tokens and step logits."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
        tokens, logits = [], []
        for _ in range(steps):
            step_logits = out.logits[:, -1]
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("label_bits, selection", [(16, "group"), (4, "head")])
def test_static_cache_decodes_like_the_dynamic_cache(label_bits, selection):
    model = tiny_model("llama")
    config = ds.SparsityConfig(
        num_channels=4, token_budget=0.25, label_bits=label_bits, sink_tokens=1, recent_tokens=2, selection=selection
    )
    input_ids, attention_mask = left_padded_batch([20, 14], seed=7)
    with ds.patched(model, random_channel_mask(model), config):
        tokens, logits = decode(model, input_ids, attention_mask, ds.make_cache(model), steps=8)
        static = ds.make_cache(model, max_cache_len=40)
        static_tokens, static_logits = decode(model, input_ids, attention_mask, static, steps=8)
    assert torch.equal(tokens, static_tokens)
    assert (logits - static_logits).abs().max() <= 1e-4
    assert static.memory()["labels"] > 0


def test_generate_with_static_cache_implementation_gets_a_label_cache():
    model = tiny_model("qwen3")
    input_ids, attention_mask = left_padded_batch([12, 12], seed=8)
    config = ds.SparsityConfig(num_channels=4, token_budget=4, label_bits=8, sink_tokens=0, recent_tokens=0)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
    )
    with torch.no_grad(), ds.patched(model, random_channel_mask(model), config):
        dynamic = model.generate(**kwargs)
        static = model.generate(**kwargs, cache_implementation="static")
    assert isinstance(static.past_key_values, ds.StaticDoubleSparseCache)
    assert torch.equal(dynamic.sequences, static.sequences)


def test_bad_max_cache_len():
    model = tiny_model("llama")
    with ds.patched(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0),
    ):
        with pytest.raises(ValueError, match="max_cache_len"):
            ds.make_cache(model, max_cache_len=0)

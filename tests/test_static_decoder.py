"""The static decode loop decodes exactly what transformers' eager generate does, compiled or not."""

import pytest
import torch

import doublesparse as ds
from doublesparse.decode import StaticDecoder

from tiny_models import left_padded_batch, random_channel_mask, tiny_model

STEPS = 6


def eager_generate(model, input_ids, attention_mask):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("patched", [False, True])
def test_static_decoder_matches_eager_generate(patched):
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded_batch([17, 11], seed=9)
    config = ds.SparsityConfig(num_channels=4, token_budget=0.25, label_bits=4, sink_tokens=1, recent_tokens=2)
    if patched:
        ds.apply(model, random_channel_mask(model), config)
    tokens, logits = eager_generate(model, input_ids, attention_mask)
    result = StaticDecoder(model, max_cache_len=32).generate(input_ids, attention_mask, STEPS, keep_logits=True)
    assert torch.equal(result.tokens, tokens)
    assert (result.logits - logits).abs().max() <= 1e-4


# aot_eager traces the step exactly as inductor receives it (graph breaks included) in seconds; the
# inductor build itself takes about half a minute on two cores, so it runs with the slow tests.
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_static_decoder_matches_eager(compile_backend):
    model = tiny_model("qwen3", num_layers=1)
    input_ids, attention_mask = left_padded_batch([9, 6], seed=10)
    ds.apply(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(num_channels=4, token_budget=3, label_bits=8, sink_tokens=0, recent_tokens=1),
    )
    eager = StaticDecoder(model, max_cache_len=16).generate(input_ids, attention_mask, 4, keep_logits=True)
    decoder = StaticDecoder(model, max_cache_len=16, compile=True, compile_backend=compile_backend)
    compiled = decoder.generate(input_ids, attention_mask, 4, keep_logits=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert (compiled.logits - eager.logits).abs().max() <= 1e-4


def test_prompt_longer_than_the_cache_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticDecoder(model, max_cache_len=8).generate(torch.ones(1, 6, dtype=torch.long), None, 4)

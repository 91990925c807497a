"""The FlexGen-like full-offload baseline cache decodes exactly what transformers' DynamicCache decodes."""

import pytest
import torch
from transformers import DynamicCache

from doublesparse.eval.bench.full_offload import FullOffloadCache, make_full_offload_cache

from tiny_models import left_padded_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(model, cache, steps=10):
    input_ids, attention_mask = left_padded_batch([40, 29], seed=2)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            past_key_values=cache,
        )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch,num_layers", [("llama", 3), ("qwen2", 1)])
def test_full_offload_cache_decodes_like_dynamic_cache(arch, num_layers):
    model = tiny_model(arch, num_layers=num_layers)
    expected_tokens, expected_logits = _generate(model, DynamicCache(config=model.config))
    # Made for exactly the final length: the copy started after the last step must not outgrow the ring.
    cache = make_full_offload_cache(model, max_cache_len=49, batch_size=2)
    tokens, logits = _generate(model, cache)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() <= 1e-5
    layers = cache.offload_layers()
    assert len(layers) == num_layers and all(layer.length == 49 for layer in layers)
    # The last layer's update started layer 0's copy for the next step, in the other ring slot.
    assert cache.pending[0].length == 49 and cache.pending[0].slot != layers[-1].slot
    memory = cache.memory()
    # K+V x layers x capacity x batch x KV heads x d x fp32
    assert memory["host"] == 2 * num_layers * 49 * 2 * 2 * 16 * 4
    assert memory["device"] == 2 * 2 * 49 * 2 * 2 * 16 * 4  # K+V of two ring slots, each one layer at capacity
    with pytest.raises(ValueError, match="max_cache_len=49"), torch.no_grad():
        model(input_ids=tokens[:, -1:], past_key_values=cache)


def test_full_offload_cache_follows_a_chunked_prefill_and_beam_search():
    model = tiny_model("mistral", num_layers=3)
    input_ids, attention_mask = left_padded_batch([30, 30], seed=5)
    outputs = []
    for cache in (DynamicCache(config=model.config), FullOffloadCache(model.config)):
        logits = []
        with torch.no_grad():
            logits.append(model(input_ids=input_ids[:, :22], past_key_values=cache).logits)
            logits.append(model(input_ids=input_ids[:, 22:], past_key_values=cache).logits)
            for _ in range(4):
                token = logits[-1][:, -1:].argmax(-1)
                logits.append(model(input_ids=token, past_key_values=cache).logits)
        outputs.append(logits)
    for expected, got in zip(*outputs):
        assert (expected - got).abs().max() <= 1e-5
    beams = []
    for cache in (DynamicCache(config=model.config), FullOffloadCache(model.config)):
        with torch.no_grad():
            beams.append(
                model.generate(
                    input_ids=input_ids,
                    max_new_tokens=5,
                    num_beams=3,
                    do_sample=False,
                    pad_token_id=0,
                    past_key_values=cache,
                )
            )
    assert torch.equal(*beams)


def test_crop_of_a_full_offload_cache_equals_never_having_stored_the_cropped_tokens():
    model = tiny_model("llama", num_layers=2)
    input_ids, _ = left_padded_batch([30], seed=5)
    with torch.no_grad():
        cache = FullOffloadCache(model.config)
        model(input_ids=input_ids, past_key_values=cache)
        cache.crop(-8)
        cropped = model(input_ids=input_ids[:, 22:23], past_key_values=cache).logits[:, -1]
        reference = DynamicCache(config=model.config)
        model(input_ids=input_ids[:, :22], past_key_values=reference)
        expected = model(input_ids=input_ids[:, 22:23], past_key_values=reference).logits[:, -1]
    assert torch.allclose(cropped, expected, atol=1e-6)

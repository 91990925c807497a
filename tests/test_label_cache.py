"""The label cache: compact labels, their quantization error, memory, and cache operations."""

import pytest
import torch

import doublesparse as ds
from doublesparse.kernels.label_append import (
    dequantize_labels,
    gather_label_channels,
    label_bytes_per_token,
    make_labels_reference,
    quantize_labels,
)

from tiny_models import left_padded_batch, random_channel_mask, tiny_model


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_labels_round_trip_within_half_a_step(bits):
    torch.manual_seed(0)
    labels = torch.randn(3, 2, 50, 16) * torch.linspace(0.1, 30, 16)
    stored = quantize_labels(labels, bits)
    restored = dequantize_labels(stored, bits)
    step = stored.scale.float()[..., None]
    # Half a quantization step, plus fp16 rounding of the stored offset.
    bound = step / 2 + labels.abs().amax(-1, keepdim=True) * 2**-11
    assert (restored - labels).abs().le(bound).all()
    assert stored.codes.dtype == torch.uint8
    assert stored.codes.shape[-1] == (16 if bits == 8 else 8)


def test_sixteen_bit_labels_keep_the_keys_16_bit_dtype():
    keys = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    channels = torch.tensor([[0, 3], [1, 2]])
    stored = make_labels_reference(keys, channels, 16)
    assert stored.codes.dtype == torch.bfloat16 and stored.scale is None
    assert torch.equal(stored.codes, gather_label_channels(keys, channels))
    assert make_labels_reference(keys.float(), channels, 16).codes.dtype == torch.float16


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cache_holds_r_bits_per_token_and_kv_head_and_no_more(bits):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2)
    config = ds.SparsityConfig(num_channels=8, token_budget=4, label_bits=bits, sink_tokens=0, recent_tokens=0)
    ds.apply(model, random_channel_mask(model), config)
    cache = ds.make_cache(model)
    input_ids, attention_mask = left_padded_batch([13, 13])
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    tokens_times_heads = 2 * 2 * 13  # batch x KV heads x tokens
    memory = cache.memory()
    assert memory["labels"] == 2 * tokens_times_heads * label_bytes_per_token(8, bits)  # 2 layers
    assert label_bytes_per_token(8, bits) == {16: 16, 8: 8 + 4, 4: 4 + 4}[bits]
    assert memory["keys"] == memory["values"] == 2 * tokens_times_heads * 16 * 4
    assert memory["total"] == memory["keys"] + memory["values"] + memory["labels"]


def _labels_match_keys(cache, bits):
    for layer in cache.layers:
        fresh = make_labels_reference(layer.keys, layer.channels, bits)
        for kept, made in zip(layer.labels, fresh):
            assert kept is None and made is None or torch.equal(kept, made)


def test_crop_reorder_and_batch_selection_keep_labels_in_step():
    model = tiny_model("llama")
    ds.apply(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(num_channels=4, token_budget=4, label_bits=4, sink_tokens=0, recent_tokens=0),
    )
    cache = ds.make_cache(model)
    input_ids, attention_mask = left_padded_batch([9, 12, 12])
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    cache.crop(-3)
    assert cache.get_seq_length() == 9
    _labels_match_keys(cache, 4)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    _labels_match_keys(cache, 4)
    cache.batch_repeat_interleave(2)
    _labels_match_keys(cache, 4)
    cache.batch_select_indices(torch.tensor([1, 4]))
    _labels_match_keys(cache, 4)
    assert cache.layers[0].labels.codes.shape[:3] == (2, 2, 9)

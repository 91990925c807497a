"""With a budget covering the whole sequence, a patched model is the dense model."""

import pytest
import torch

import doublesparse as ds
from doublesparse.kernels.sparse_attention import masked_attention_reference, sparse_attention_reference

from tiny_models import ARCHITECTURES, left_padded_batch, random_channel_mask, tiny_model

TOLERANCE = 1e-5


def generate(model, input_ids, attention_mask, steps=6):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("selection, num_kv_heads", [("group", 2), ("head", 2), ("group", 4)])
def test_full_budget_equals_dense_with_left_padding(arch, selection, num_kv_heads):
    model = tiny_model(arch, num_kv_heads=num_kv_heads)
    input_ids, attention_mask = left_padded_batch([14, 9], seed=1)
    with torch.no_grad():
        dense_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        dense = generate(model, input_ids, attention_mask)
        config = ds.SparsityConfig(
            num_channels=4, token_budget=64, label_bits=4, selection=selection, sink_tokens=0, recent_tokens=0
        )
        with ds.patched(model, random_channel_mask(model), config):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            sparse = generate(model, input_ids, attention_mask)
            assert isinstance(sparse.past_key_values, ds.DoubleSparseCache)
    real = attention_mask.bool()
    assert (logits - dense_logits)[real].abs().max() <= TOLERANCE
    for step_sparse, step_dense in zip(sparse.logits, dense.logits):
        assert (step_sparse - step_dense).abs().max() <= TOLERANCE
    assert torch.equal(sparse.sequences, dense.sequences)


def test_fractional_full_budget_in_simulate_mode_equals_dense():
    model = tiny_model("qwen3")
    input_ids, attention_mask = left_padded_batch([16, 11], seed=2)
    with torch.no_grad():
        dense = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with ds.patched(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(
                num_channels=4, token_budget=1.0, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0
            ),
        ):
            simulated = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    assert (simulated - dense)[attention_mask.bool()].abs().max() <= TOLERANCE


def test_sparse_kernels_selecting_every_token_equal_dense_attention():
    torch.manual_seed(0)
    query = torch.randn(2, 8, 1, 16)
    keys, values = torch.randn(2, 2, 2, 21, 16).unbind(0)
    dense = torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
    everything = torch.arange(21).expand(2, 2, 1, 21)
    all_valid = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    assert torch.allclose(
        sparse_attention_reference(query, keys, values, everything, all_valid, 0.25), dense, atol=1e-6
    )
    selected = torch.ones(2, 2, 1, 21, dtype=torch.bool)
    assert torch.allclose(masked_attention_reference(query, keys, values, selected, 0.25), dense, atol=1e-6)


def test_remove_restores_outputs_bit_for_bit():
    model = tiny_model("mixtral")
    input_ids, attention_mask = left_padded_batch([10, 10])
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ds.apply(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(
                num_channels=4, token_budget=2, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0
            ),
        )
        patched = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        ds.remove(model)
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.equal(patched, before), "a 2-token budget must change the outputs"
    assert torch.equal(before, after)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert model.config._attn_implementation == "sdpa"


def test_sliding_window_layers_stay_dense_with_a_note(caplog):
    model = tiny_model("mistral", sliding_window=6)
    input_ids, attention_mask = left_padded_batch([15, 15])
    with torch.no_grad():
        dense = generate(model, input_ids, attention_mask)
        with caplog.at_level("WARNING"):
            with ds.patched(
                model,
                random_channel_mask(model),
                ds.SparsityConfig(num_channels=2, token_budget=2, label_bits=16, sink_tokens=0, recent_tokens=0),
            ):
                sparse = generate(model, input_ids, attention_mask)
    assert "sliding-window layers [0, 1] stay dense" in caplog.text
    assert torch.equal(sparse.sequences, dense.sequences)
    for step_sparse, step_dense in zip(sparse.logits, dense.logits):
        assert (step_sparse - step_dense).abs().max() <= TOLERANCE


def test_beam_search_with_full_budget_equals_dense_and_small_budget_runs():
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded_batch([12, 8], seed=5)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, num_beams=3, do_sample=False)
    with torch.no_grad():
        dense = model.generate(**kwargs)
        with ds.patched(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(num_channels=4, token_budget=64, label_bits=16, sink_tokens=0, recent_tokens=0),
        ):
            full = model.generate(**kwargs)
        with ds.patched(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(num_channels=4, token_budget=3, label_bits=8, sink_tokens=0, recent_tokens=0),
        ):
            small = model.generate(**kwargs)
    assert torch.equal(full, dense)
    assert small.shape == dense.shape

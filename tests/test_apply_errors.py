"""Bad input gets a ValueError that says what to change, and leaves the model untouched."""

import pytest
import torch

import doublesparse as ds

from tiny_models import random_channel_mask, tiny_model


def untouched(model) -> bool:
    return (
        model.config._attn_implementation == "sdpa"
        and not hasattr(model, "_doublesparse_state")
        and not any(hasattr(m, "_doublesparse_plan") for m in model.modules())
        and sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    )


def test_mask_for_another_model():
    model = tiny_model("llama", num_layers=2)
    other = tiny_model("llama", num_layers=3)
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        ds.apply(model, random_channel_mask(other))
    assert untouched(model)


def test_mask_with_other_head_count():
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    other = tiny_model("qwen2", num_heads=8, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        ds.apply(model, random_channel_mask(other))
    assert untouched(model)


def test_channel_count_above_head_dim():
    model = tiny_model("phi3")
    with pytest.raises(ValueError, match="num_channels"):
        ds.apply(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(num_channels=32, label_bits=16, sink_tokens=0, recent_tokens=0),
        )
    assert untouched(model)


def test_dense_layer_out_of_range():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_layers"):
        ds.apply(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(dense_layers=[7], num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0),
        )
    assert untouched(model)


def test_missing_mask_file(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not exist"):
        ds.apply(model, tmp_path / "nope.safetensors")
    assert untouched(model)


def test_unsupported_model():
    class Legacy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_model("llama").config

    with pytest.raises(ValueError, match="attention interface"):
        ds.apply(Legacy(), random_channel_mask(tiny_model("llama")))


def test_failure_while_patching_rolls_back(monkeypatch):
    model = tiny_model("llama")

    def broken(name):
        raise RuntimeError("backend switch failed")

    monkeypatch.setattr(model, "set_attn_implementation", broken)
    with pytest.raises(RuntimeError):
        ds.apply(
            model,
            random_channel_mask(model),
            ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0),
        )
    monkeypatch.undo()
    assert untouched(model)


def test_double_apply_and_foreign_filled_cache():
    model = tiny_model("llama")
    ds.apply(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0),
    )
    with pytest.raises(ValueError, match="already patched"):
        ds.apply(model, random_channel_mask(model))
    from transformers import DynamicCache

    filled = DynamicCache(config=model.config)
    filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="label cache"):
        model(input_ids=torch.tensor([[5]]), past_key_values=filled)
    ds.remove(model)
    assert untouched(model)

"""Heads per rank without launching ranks: plans sliced to a rank's heads, and calls that do not fit them refused.

The real two-rank run is tests/test_tensor_parallel.py (slow); these check the pieces it relies on.
"""

import pytest
import torch

import doublesparse as ds
from doublesparse.attention import double_sparse_attention
from doublesparse.plan import layer_plans
from doublesparse.sharding import HeadShard, head_shards, local_layout
from doublesparse.support import attention_modules

from tiny_models import random_channel_mask, tiny_model


def rank_one_of_two(layers: int) -> dict:
    """The heads rank 1 of 2 holds in a 4 query / 2 KV head model."""
    return {i: HeadShard(i, rank=1, world_size=2, q_start=2, q_stop=4, kv_start=1, kv_stop=2) for i in range(layers)}


def test_a_model_without_tensor_parallelism_has_no_shards():
    model = tiny_model("llama")
    layout = ds.HeadLayout.from_config(model.config)
    assert model.tp_plan  # transformers exposes the config's plan even when nothing is sharded
    assert head_shards(model, attention_modules(model, layout), layout) is None
    assert local_layout(layout, None) is layout


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_plans_keep_the_rows_of_the_ranks_heads(selection, per_kv_head):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    layout = ds.HeadLayout.from_config(model.config)
    mask = random_channel_mask(model, seed=2, per_kv_head=per_kv_head)
    config = ds.SparsityConfig(num_channels=4, selection=selection, label_bits=16, sink_tokens=0, recent_tokens=0)
    whole = layer_plans(mask, config, layout)
    sharded = layer_plans(mask, config, layout, shards=rank_one_of_two(layout.num_layers))
    for layer, plan in sharded.items():
        rows_per_kv = per_kv_head or selection == "group"
        expected = whole[layer].channels[1:2] if rows_per_kv else whole[layer].channels[2:4]
        assert torch.equal(plan.channels, expected)
        assert (plan.num_heads, plan.num_kv_heads) == (2, 1)
        assert plan.num_select_heads == (1 if selection == "group" else 2)
    assert local_layout(layout, rank_one_of_two(layout.num_layers)).num_heads == 2


def test_an_attention_call_with_other_head_counts_is_refused():
    # What tensor parallelism does to an unpatched-for-it plan: the call carries half the heads.
    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    ds.apply(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(num_channels=4, token_budget=4, label_bits=16, sink_tokens=0, recent_tokens=0),
    )
    module = model.model.layers[0].self_attn
    query, key = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 9, 16)
    with pytest.raises(ValueError, match="2 query heads and 1 KV heads, but the plan was made for 4 and 2"):
        double_sparse_attention(module, query, key, key.clone(), None)
    plan = module._doublesparse_plan
    plan.shard = rank_one_of_two(2)[0]
    with pytest.raises(ValueError, match="rank 1 of 2, layer 0"):
        double_sparse_attention(module, query, key, key.clone(), None)


def test_shard_description_names_rank_and_head_counts():
    layout = ds.HeadLayout(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    text = rank_one_of_two(2)[1].describe(layout)
    assert text == ("rank 1 of 2, layer 1: this rank holds query heads 2..3 (2 of 4) and KV heads 1..1 (1 of 2)")

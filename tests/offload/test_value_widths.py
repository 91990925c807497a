"""Offloaded layers whose values are narrower than their keys: stores, window and copy buffers of each width.

No model that doublesparse serves in offload mode has them (MLA caches latents and is refused there), so
the offload layer is driven directly: the same keys and values, stored in host memory and attended with
the offload step, give what the device-resident step gives over them, for decode rows and multi-row
calls, with learned sinks and softcapping too; and host memory is counted per width.
"""

import pytest
import torch

import doublesparse as ds
from doublesparse.label_attention import attend_over_labels
from doublesparse.offload import OffloadCache, host_kv_bytes
from doublesparse.offload.host_memory import host_store_bytes
from doublesparse.plan import LayerPlan
from doublesparse.step import AttentionCall

from tiny_models import tiny_config

KEY_DIM, VALUE_DIM, NUM_Q, NUM_KV, BATCH = 24, 8, 4, 2, 2
CONFIG = ds.SparsityConfig(
    num_channels=4, token_budget=5, label_bits=8, sink_tokens=1, recent_tokens=2, backend="torch"
)


def problem(length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, NUM_KV, length, KEY_DIM, generator=generator)
    values = torch.randn(BATCH, NUM_KV, length, VALUE_DIM, generator=generator)
    channels = torch.stack([torch.randperm(KEY_DIM, generator=generator)[:4].sort().values for _ in range(NUM_KV)])
    return keys, values, channels


def offload_layer(channels, config, max_cache_len=None):
    cache = OffloadCache(tiny_config("llama", num_layers=1), {0: channels}, config, max_cache_len)
    return cache, cache.layers[0]


def device_step(query, keys, values, plan, extras):
    module = torch.nn.Module().eval()
    return attend_over_labels(AttentionCall(module, query, keys, values, None, kwargs=extras), plan)[0]


EXTRAS = [{}, {"s_aux": torch.tensor([0.5, -1.0, 2.0, 0.0])}, {"softcap": 1.5}]


@pytest.mark.parametrize("extras", EXTRAS, ids=["plain", "sinks", "softcap"])
@pytest.mark.parametrize("new_rows", [1, 3])
def test_offloaded_values_of_their_own_width_attend_like_device_ones(new_rows, extras):
    length = 20
    keys, values, channels = problem(length)
    query = 3 * torch.randn(BATCH, NUM_Q, new_rows, KEY_DIM, generator=torch.Generator().manual_seed(1))
    plan = LayerPlan(0, CONFIG, channels, NUM_KV, num_heads=NUM_Q, num_kv_heads=NUM_KV)
    cache, layer = offload_layer(channels, CONFIG)
    past = length - new_rows
    layer.update(keys[:, :, :past], values[:, :, :past])
    new_keys, new_values = layer.update(keys[:, :, past:], values[:, :, past:])
    assert new_values.shape[-1] == VALUE_DIM
    module = torch.nn.Module().eval()
    out, _ = layer.attend(AttentionCall(module, query, new_keys, new_values, None, kwargs=extras), plan)
    expected = device_step(query, keys, values, plan, extras)
    assert out.shape == (BATCH, new_rows, NUM_Q, VALUE_DIM)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert device_step(query, keys, values, plan, {}).sub(expected).abs().max() > 1e-3 or not extras


def test_host_memory_is_counted_per_width():
    keys, values, channels = problem(10)
    cache, layer = offload_layer(channels, CONFIG)
    layer.update(keys, values)
    report = cache.memory()
    # The first stores hold 256 tokens (pinned ones as the pinned allocator rounds them, where CUDA is).
    assert report["host_keys"] == host_store_bytes(256, BATCH * NUM_KV * KEY_DIM * 4)
    assert report["host_values"] == host_store_bytes(256, BATCH * NUM_KV * VALUE_DIM * 4)
    assert cache.host_budget.reserved[0] == report["host_keys"] + report["host_values"]
    assert host_kv_bytes(1, BATCH, NUM_KV, KEY_DIM, 256, torch.float32, value_dim=VALUE_DIM) == (
        report["host_keys"] + report["host_values"]
    )
    # A preallocated length reserves both widths for the whole context up front.
    needed = host_kv_bytes(1, BATCH, NUM_KV, KEY_DIM, 100, torch.float32, value_dim=VALUE_DIM)
    limited = CONFIG.replace(host_memory_limit=needed)
    cache, layer = offload_layer(channels, limited, max_cache_len=100)
    layer.update(keys, values)
    assert cache.host_budget.reserved[0] == needed
    cache, layer = offload_layer(channels, limited, max_cache_len=200)
    with pytest.raises(ValueError, match="host memory"):
        layer.update(keys, values)

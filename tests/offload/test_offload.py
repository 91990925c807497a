"""Double Sparsity-Offload: exactness without prediction, prediction guarantees, memory accounting and checks."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import doublesparse as ds
from doublesparse import offload
from doublesparse.kernels.host_gather import host_gather_reference, host_gather_triton
from doublesparse.offload import attention as offload_step
from doublesparse.offload import host_memory
from doublesparse.support import attention_modules

from tiny_models import ARCHITECTURES, left_padded_batch, random_channel_mask, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


BASE = ds.SparsityConfig(num_channels=4, token_budget=9, label_bits=8, sink_tokens=2, recent_tokens=3)


def generate(model, config, lengths=(40, 29), steps=10, cache=None, **options):
    """Greedy generation under `config`: (sequences, logits [steps, B, V], cache)."""
    input_ids, attention_mask = left_padded_batch(list(lengths), seed=2)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model, seed=1), config):
        if cache == "make":
            options["past_key_values"] = ds.make_cache(model)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **options,
        )
    return out.sequences, torch.stack(out.logits), out.past_key_values


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_offload_without_prediction_equals_double_sparsity(arch):
    model = tiny_model(arch, num_layers=3)
    expected_tokens, expected_logits, _ = generate(model, BASE)
    tokens, logits, cache = generate(model, BASE.replace(offload=True))
    assert isinstance(cache, offload.OffloadCache)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "changes",
    [
        dict(selection="head", label_bits=4),
        dict(token_budget=0.25, sink_tokens=0, recent_tokens=0, min_seq_len=20, label_bits=16),
        dict(dense_layers=(1,), recent_tokens=6),
        dict(prefetch=True, sync_layers=(0, 1, 2)),
    ],
)
def test_offload_equals_double_sparsity_across_settings(changes):
    model = tiny_model("llama", num_layers=3)
    config = BASE.replace(**{k: v for k, v in changes.items() if k not in ("prefetch", "sync_layers")})
    expected_tokens, expected_logits, _ = generate(model, config)
    tokens, logits, _ = generate(model, BASE.replace(offload=True, **changes), cache="make")
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() <= 1e-5


def test_multi_token_step_after_prefill_matches_double_sparsity():
    model = tiny_model("qwen2", num_layers=2)
    input_ids, attention_mask = left_padded_batch([30, 30], seed=5)
    outputs = []
    for config in (BASE, BASE.replace(offload=True)):
        with torch.no_grad(), ds.patched(model, random_channel_mask(model, seed=1), config):
            cache = ds.make_cache(model)
            model(input_ids=input_ids[:, :26], past_key_values=cache)
            outputs.append(model(input_ids=input_ids[:, 26:], past_key_values=cache).logits)
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def test_beam_search_reorders_the_offloaded_store():
    model = tiny_model("llama", num_layers=2)
    expected, _, _ = generate(model, BASE, steps=6, num_beams=3)
    tokens, _, _ = generate(model, BASE.replace(offload=True), steps=6, num_beams=3)
    assert torch.equal(tokens, expected)


def test_prediction_keeps_outputs_finite_current_token_attended_and_reports_recall(monkeypatch):
    model = tiny_model("llama", num_layers=4)
    calls = []
    original = offload_step.sparse_attention

    def spy(query, keys, values, indices, slot_valid, scaling, backend):
        calls.append(slot_valid.clone())
        return original(query, keys, values, indices, slot_valid, scaling, backend)

    monkeypatch.setattr(offload_step, "sparse_attention", spy)
    config = BASE.replace(offload=True, prefetch=True, prefetch_warmup_steps=2, prefetch_min_recall=0.0)
    _, logits, cache = generate(model, config, steps=8)
    assert torch.isfinite(logits).all()
    report = cache.prefetch_report()
    assert report["sync_layers"] == [0]
    assert set(report["recall"]) == {"1", "2", "3"} and all(0.0 <= r <= 1.0 for r in report["recall"].values())
    # The window heads every attended buffer; its last slot is the current token, always attended.
    window = config.recent_tokens
    assert len(calls) == 7 * 4
    assert all(bool(valid[..., window - 1].all()) for valid in calls)
    # After the warm-up, layers 1-3 attended over rows copied into the ring buffers.
    assert cache.buffers.ring[0] is not None and cache.buffers.ring[1] is not None


def test_automatic_sync_layers_follow_measured_recall():
    model = tiny_model("llama", num_layers=3)
    _, _, cache = generate(
        model, BASE.replace(offload=True, prefetch=True, prefetch_warmup_steps=2, prefetch_min_recall=1.0), steps=5
    )
    report = cache.prefetch_report()
    below = [int(i) for i, recall in report["recall"].items() if recall < 1.0]
    assert report["sync_layers"] == sorted({0, *below})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_query_predictor_reproduces_the_layer_query(arch):
    model = tiny_model(arch, num_layers=2)
    queries, inputs = {}, {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("offload_test_recorder", recording_attention)
    model.set_attn_implementation("offload_test_recorder")
    from doublesparse.layout import HeadLayout

    modules = attention_modules(model, HeadLayout.from_config(model.config))
    predictors = offload.query_predictors(model, modules)
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k, i=i: inputs.__setitem__(i, (a[0] if a else k["hidden_states"], k["position_embeddings"])),
            with_kwargs=True,
        )
        for i, (layer, _) in predictors.items()
    ]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 7)))
    for hook in hooks:
        hook.remove()
    for index, (_, predictor) in predictors.items():
        with torch.no_grad():
            predicted = predictor(*inputs[index])
        assert torch.allclose(predicted, queries[index], atol=1e-5)


def test_prefetch_fails_clearly_where_the_next_query_cannot_be_predicted():
    model = tiny_model("llama", num_layers=2)
    del model.model.layers[1].input_layernorm
    with pytest.raises(ValueError, match="prefetch=False"):
        ds.apply(model, random_channel_mask(model), BASE.replace(offload=True, prefetch=True))
    assert getattr(model, "_doublesparse_state", None) is None


def test_device_memory_grows_only_by_labels():
    model = tiny_model("llama", num_layers=3)
    # The stores start at 256 tokens and double: decoding from 250 to 262 tokens crosses a growth.
    input_ids, attention_mask = left_padded_batch([250, 243], seed=2)
    reports = []
    with (
        torch.no_grad(),
        ds.patched(
            model,
            random_channel_mask(model, seed=1),
            BASE.replace(offload=True, prefetch=True, prefetch_warmup_steps=1),
        ),
    ):
        cache = ds.make_cache(model)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache).logits
        for step in range(12):
            token = logits[:, -1:].argmax(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            logits = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache).logits
            if step in (1, 11):
                reports.append(cache.memory())
    first, last = reports
    layers = cache.offload_layers()
    assert len(layers) == 3 and all(layer.length == 262 for layer in layers)
    assert last["device_labels"] > first["device_labels"] and last["host"] > first["host"]
    assert last["device"] - first["device"] == last["device_labels"] - first["device_labels"]
    assert first["device_keys"] == first["device_values"] == 0
    # Host holds at least every token's K and V; the device holds no layer's full K/V.
    kv_bytes = 2 * 3 * 2 * 2 * 16 * 4 * 262  # K+V x layers x batch x KV heads x head_dim x fp32 x tokens
    assert last["host"] >= kv_bytes
    assert last["device"] < kv_bytes / 4
    assert last["total"] == last["host"] + last["device"]


def test_a_context_host_memory_cannot_hold_fails_before_decoding():
    model = tiny_model("llama", num_layers=2)
    config = BASE.replace(offload=True, host_memory_limit=1 << 20)
    input_ids, _ = left_padded_batch([12], seed=2)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model), config):
        with pytest.raises(ValueError, match="host_memory_limit"):
            ds.make_cache(model, max_cache_len=100_000, batch_size=1)
        # Without a batch size, batch 1 already needs more than the limit: refused at make_cache too.
        with pytest.raises(ValueError, match="batch 1, the least any batch needs"):
            ds.make_cache(model, max_cache_len=100_000)
        # A cache built without the check fails at the prefill, before allocating.
        channels = {0: torch.arange(4)[None].repeat(2, 1)}
        cache = offload.OffloadCache(model.config, channels, config, max_cache_len=100_000)
        with pytest.raises(ValueError, match="max_cache_len"):
            model(input_ids=input_ids, past_key_values=cache)
        assert all(layer.host_keys.data is None for layer in cache.offload_layers())
        # Without a configured limit the RAM available now is the limit.
        with pytest.raises(ValueError, match=r"needs [\d.,]+ [KMGT]iB"):
            unlimited = offload.OffloadCache(
                model.config, {0: torch.arange(4)[None].repeat(2, 1)}, BASE.replace(offload=True), max_cache_len=1 << 40
            )
            model(input_ids=input_ids, past_key_values=unlimited)
        # A cache that fits decodes.
        small = ds.make_cache(model, max_cache_len=64)
        model(input_ids=input_ids, past_key_values=small)
        assert small.offload_layers()[0].host_keys.capacity == 64


def test_pinned_stores_are_budgeted_as_the_pinned_allocator_rounds_them(monkeypatch):
    # torch's caching pinned allocator rounds sizes up to a power of two: a 100-token store of 48-byte
    # rows (4800 bytes) really takes 8192, and the host check must refuse what would not fit so.
    monkeypatch.setattr(host_memory, "pinned_host_stores", lambda: True)
    assert offload.host_store_bytes(100, 48) == 8192
    assert offload.host_store_bytes(100, 48, pinned=False) == 4800
    assert offload.host_kv_bytes(3, 1, 3, 4, 100, torch.float32) == 2 * 3 * 8192
    budget = offload.HostMemoryBudget(limit=2 * 3 * 8192 - 1)
    with pytest.raises(ValueError, match="host_memory_limit"):
        budget.reserve({i: offload.host_kv_bytes(1, 1, 3, 4, 100, torch.float32) for i in range(3)}, "three layers")
    monkeypatch.setattr(host_memory, "pinned_host_stores", lambda: False)
    assert offload.host_kv_bytes(3, 1, 3, 4, 100, torch.float32) == 2 * 3 * 4800


def test_offload_config_is_validated():
    for bad in (
        dict(prefetch=True),
        dict(offload=True, simulate=True),
        dict(offload=True, sync_layers=(-1,)),
        dict(prefetch_min_recall=1.5),
        dict(prefetch_warmup_steps=-1),
        dict(host_memory_limit=0),
    ):
        with pytest.raises(ValueError):
            ds.SparsityConfig(**bad)
    config = ds.SparsityConfig(
        offload=True, prefetch=True, sync_layers=[2, 0], label_bits=16, sink_tokens=0, recent_tokens=0
    )
    assert config.sync_layers == (0, 2)
    assert ds.SparsityConfig.from_dict(config.to_dict()) == config
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="sync_layers"):
        ds.apply(model, random_channel_mask(model), config)


def test_offload_needs_its_cache():
    model = tiny_model("llama", num_layers=2)
    input_ids, _ = left_padded_batch([12], seed=2)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model), BASE.replace(offload=True)):
        state = ds.patch_state(model)
        channels = {i: plan.channels for i, plan in state.plans.items()}
        cache = ds.DoubleSparseCache(model.config, channels, BASE.label_bits)
        with pytest.raises(ValueError, match="offload cache"):
            model(input_ids=input_ids, past_key_values=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_host_gather_kernel_matches_reference(dtype):
    torch.manual_seed(0)
    store = torch.randn(50, 2, 3, 24).to(dtype)  # [capacity, B, H, d], head_dim not a power of two
    indices = torch.randint(0, 50, (2, 3, 37))
    expected = host_gather_reference(store, indices, torch.empty(2, 3, 37, 24, dtype=dtype))
    buffer = torch.zeros(2, 3, 45, 24, dtype=dtype)
    host_gather_triton(store, indices, buffer[:, :, 5:42])
    assert torch.equal(buffer[:, :, 5:42], expected)
    assert not buffer[:, :, :5].any() and not buffer[:, :, 42:].any()


def _decode_after(model, cache, input_ids, keep):
    """Feed `input_ids`, crop the cache back to `keep` tokens, decode the token at `keep`: its logits."""
    model(input_ids=input_ids, past_key_values=cache)
    cache.crop(keep - input_ids.shape[1])
    step = input_ids[:, keep : keep + 1]
    return model(input_ids=step, past_key_values=cache).logits[:, -1]


def test_crop_of_an_offload_cache_equals_never_having_stored_the_cropped_tokens():
    # Assisted decoding rejects draft tokens by cropping the cache: host K/V, labels and the device
    # window must all go back to the shorter past together (HostStoredLayer.crop + OffloadLayer's window).
    model = tiny_model("llama", num_layers=2)
    input_ids, _ = left_padded_batch([30], seed=5)
    config = BASE.replace(offload=True)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model), config):
        cropped = _decode_after(model, ds.make_cache(model), input_ids, 22)
        fresh_cache = ds.make_cache(model)
        model(input_ids=input_ids[:, :22], past_key_values=fresh_cache)
        fresh = model(input_ids=input_ids[:, 22:23], past_key_values=fresh_cache).logits[:, -1]
    assert torch.allclose(cropped, fresh, atol=1e-6)
    with pytest.raises(ValueError, match="negative count"):
        fresh_cache.layers[0].crop(3)

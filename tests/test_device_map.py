"""Models dispatched by accelerate (device_map): plans, labels, scratch and offload buffers follow each layer.

This machine has no second device, so the real split exercised here is the one accelerate can do on a
CPU: some layers on "cpu", others offloaded to disk (their weights rest on "meta" and are loaded by
accelerate's hooks for each call, which then computes on the CPU). The per-device bookkeeping
(scratch, offload copy buffers) is checked with "meta" tensors standing in for a second device.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import doublesparse as ds
from doublesparse.decode import StaticDecoder
from doublesparse.kernels.scratch import Scratch
from doublesparse.offload import OffloadCache
from doublesparse.support import module_device

from tiny_models import left_padded_batch, random_channel_mask, tiny_model

pytest.importorskip("accelerate")

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_map")
    tiny_model("llama", num_heads=4, num_kv_heads=2, num_layers=4).save_pretrained(folder / "model")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(4)})
    dispatched = AutoModelForCausalLM.from_pretrained(
        folder / "model", device_map=device_map, offload_folder=str(folder / "offload"), dtype=torch.float32
    ).eval()
    whole = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    return dispatched, whole


def decode(model, static: bool):
    input_ids, attention_mask = left_padded_batch([30, 24], seed=4)
    with torch.no_grad():
        if static:
            result = StaticDecoder(model, input_ids.shape[1] + NEW_TOKENS).generate(
                input_ids, attention_mask, max_new_tokens=NEW_TOKENS, keep_logits=True
            )
            return result.tokens, result.logits
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)


def test_disk_offloaded_layers_compute_on_their_execution_device(models):
    dispatched, _ = models
    attention = dispatched.model.layers[1].self_attn
    assert attention.q_proj.weight.device.type == "meta"  # resting on disk
    assert module_device(attention) == torch.device("cpu")
    mask = random_channel_mask(dispatched)
    with ds.patched(
        dispatched,
        mask,
        ds.SparsityConfig(num_channels=4, backend="torch", label_bits=16, sink_tokens=0, recent_tokens=0),
    ):
        plans = ds.patch.patch_state(dispatched).plans
        assert {plan.backend_device for plan in plans.values()} == {"cpu"}


@pytest.mark.parametrize(
    "static, fields",
    [
        (False, dict(selection="group", label_bits=4)),
        (True, dict(selection="head", label_bits=4)),
        (False, dict(selection="group", label_bits=8, offload=True, prefetch=True, prefetch_warmup_steps=1)),
    ],
    ids=["growing", "static", "offload"],
)
def test_dispatched_model_decodes_as_the_whole_one(models, static, fields):
    dispatched, whole = models
    mask = random_channel_mask(whole, seed=1)
    config = ds.SparsityConfig(num_channels=4, token_budget=6, sink_tokens=1, recent_tokens=2, **fields)
    with ds.patched(whole, mask, config):
        want_tokens, want_logits = decode(whole, static)
    with ds.patched(dispatched, mask, config):
        got_tokens, got_logits = decode(dispatched, static)
    assert torch.equal(want_tokens, got_tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_scratch_keeps_one_buffer_per_device():
    scratch = Scratch()
    on_cpu = scratch.get("scores", (2, 3), torch.float32, torch.device("cpu"))
    on_other = scratch.get("scores", (2, 3), torch.float32, torch.device("meta"))
    # Alternating layers on two devices get their own buffers back, never a reallocation.
    assert scratch.get("scores", (2, 3), torch.float32, torch.device("cpu")) is on_cpu
    assert scratch.get("scores", (2, 3), torch.float32, torch.device("meta")) is on_other


def test_offload_copy_buffers_are_per_device():
    model = tiny_model("llama")
    ds.apply(
        model,
        random_channel_mask(model),
        ds.SparsityConfig(offload=True, label_bits=16, sink_tokens=0, recent_tokens=0),
    )
    cache = ds.make_cache(model)
    assert isinstance(cache, OffloadCache)
    cpu, other = torch.device("cpu"), torch.device("meta")
    first = cache.buffers_for(cpu)
    assert first is cache.buffers and cache.buffers_for(other) is not first
    keys, _ = cache.buffers_for(cpu).sync_views((1, 2, 4, 16), torch.float32, cpu)
    cache.buffers_for(other).sync_views((1, 2, 4, 16), torch.float32, other)
    assert cache.buffers_for(cpu).sync_views((1, 2, 4, 16), torch.float32, cpu)[0].data_ptr() == keys.data_ptr()
    assert cache.memory()["device_buffers"] == 2 * 2 * (1 * 2 * 4 * 16 * 4)


def test_calibration_of_a_dispatched_model_equals_the_whole_ones(models):
    from doublesparse.calibration import calibrate_blocks

    dispatched, whole = models
    blocks = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    want = calibrate_blocks(whole, blocks, progress=False)
    got = calibrate_blocks(dispatched, blocks, progress=False)
    assert torch.equal(want.ranking, got.ranking)
    for kind in want.statistics:
        torch.testing.assert_close(got.statistics[kind], want.statistics[kind])

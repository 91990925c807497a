"""What doublesparse promises about bad input: the right result, or a ValueError saying what to change.

One section per item of the reliability issue (issue 13), each test the issue's repro followed by the
result it must give. Item 5 (a corrupted native library) is tested in tests/kernels/test_native_build.py.
"""

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import doublesparse as ds
from doublesparse.attention import double_sparse_attention
from doublesparse.calibration import calibrate_blocks
from doublesparse.channels import ChannelMask
from doublesparse.layout import HeadLayout, shape_fingerprint
from doublesparse.support import (
    ATTENTION_KWARG_VALUES,
    SERVED_ATTENTION_KWARGS,
    UNDERSTOOD_ATTENTION_KWARGS,
    attention_modules,
    check_attention_kwargs,
)

from tiny_models import MATRIX, left_padded_batch, random_channel_mask, tiny_model

SMALL = ds.SparsityConfig(num_channels=4, token_budget=3, label_bits=16, sink_tokens=0, recent_tokens=0)


def untouched(model) -> bool:
    return (
        not hasattr(model, "_doublesparse_state")
        and "generate" not in model.__dict__
        and not any(hasattr(m, "_doublesparse_plan") for m in model.modules())
        and sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    )


def mask_for(model) -> ChannelMask:
    layout = HeadLayout.from_config(model.config)
    ranking = torch.arange(layout.head_dim).expand(layout.num_layers, layout.num_heads, -1)
    return ChannelMask(ranking, "qk", layout, per_kv_head=False)


def greedy(model, prompt, **extra):
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return model.generate(prompt, **kwargs, **extra)


# The evaluation commands (items 9 and 14): their command lines, and a fixture that catches any work started.
EVAL = ["eval", "--model", "tiny-random", "--channels", "calibrate", "--no-progress"]
RUN = ["run", "--tiny", "--no-progress"]
RECALL = ["recall", "--model", "tiny-random", "--no-progress"]
BENCHES = [["bench", name, "--no-progress"] for name in ("kernels", "decode", "offload")]
BENCH_CALIBRATION = ["bench", "calibration"]


@pytest.fixture
def no_eval_work(monkeypatch):
    """Fail the test if an evaluation command loads a model, runs its grid or starts timing."""
    from doublesparse.eval.bench import calibration, decode, kernels, offload
    from doublesparse.eval.harness import runner
    from doublesparse.eval.models import source

    def refuse(*args, **kwargs):
        raise AssertionError("the command started work before checking its arguments")

    monkeypatch.setattr(source.ModelSource, "load", refuse)
    monkeypatch.setattr(runner, "execute_plan", refuse)
    for module in (kernels, decode, offload, calibration):
        monkeypatch.setattr(module, "set_threads", refuse)
    monkeypatch.setattr(calibration, "_model", refuse)


def refused(capsys, argv, message) -> None:
    """`doublesparse ARGV` exits 2, printing one error line that matches `message`, and no traceback."""
    from doublesparse.cli import main

    assert main([str(part) for part in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"doublesparse {argv[0]}: error: ") and "Traceback" not in error, error
    assert re.search(message, error), error


# ---------------------------------------------------------------------------------------------- 1
# Attention keyword arguments doublesparse does not understand are refused by name.


def test_1_learned_sinks_are_served_and_sinks_of_the_wrong_shape_refused():
    # gpt-oss passes its sinks as s_aux: served (tests/test_architectures.py checks the results); a sink
    # tensor that is not one float logit per query head is refused by name, at apply and at the call.
    model = tiny_model("gpt_oss")
    with ds.patched(model, mask_for(model), SMALL), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    module = model.model.layers[0].self_attn
    call = (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), None)
    for bad in (torch.zeros(3), torch.zeros(1, 4), torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(
            ValueError, match=r"GptOssAttention passes s_aux=.*one float logit per query head, shape \[4\]"
        ):
            double_sparse_attention(module, *call, s_aux=bad)
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"GptOssAttention.sinks is a torch.float32 tensor of shape \(4, 2\)"):
        ds.apply(model, mask_for(model))
    assert untouched(model)


def test_1_logit_softcapping_is_served_and_a_bad_cap_refused():
    model = tiny_model("gemma2")
    with ds.patched(model, mask_for(model), SMALL), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    module = model.model.layers[0].self_attn
    call = (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), None)
    for bad in (0.0, -2.0, float("inf"), "50", True):
        with pytest.raises(ValueError, match=r"Gemma2Attention passes softcap=.* a positive finite number"):
            double_sparse_attention(module, *call, softcap=bad)


def test_1_sinks_or_softcap_with_attention_dropout_in_training_are_refused():
    # The exact dense path that keeps sinks and softcapping has no dropout: training with it is refused.
    model = tiny_model("gemma2", attention_dropout=0.1)
    with ds.patched(model, mask_for(model), SMALL):
        model.train()
        with pytest.raises(ValueError, match=r"attention dropout \(0.1\) with learned sinks or softcapping"):
            model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]]))


@pytest.mark.parametrize(
    "name, value, what",
    [
        ("s_aux", torch.zeros(3), "one float logit per query head"),
        ("sinks", torch.zeros(4), "sinks in a form other than gpt-oss's s_aux"),
        ("softcap", -30.0, "a positive finite number"),
        ("cu_seq_lens_q", torch.tensor([0, 5]), "packed"),
        ("is_causal", False, "bidirectional"),
        ("a_feature_added_later", 1, "an attention feature"),
    ],
)
def test_1_unknown_attention_kwargs_are_refused_at_every_call(name, value, what):
    # A model whose config and modules do not show the feature: the call-time check is the net,
    # on the dense prefill as on sparse steps.
    model = tiny_model("llama")
    ds.apply(model, random_channel_mask(model), SMALL)

    def add_kwarg(module, args, kwargs):
        kwargs[name] = value
        return args, kwargs

    model.model.layers[1].self_attn.register_forward_pre_hook(add_kwarg, with_kwargs=True)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"LlamaAttention passes {name}=.*{what}"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))


def test_1_kwargs_passed_as_none_and_understood_ones_pass():
    module = tiny_model("llama").model.layers[0].self_attn
    check_attention_kwargs(module, {"s_aux": None, "softcap": None, "is_causal": True, "output_attentions": False})
    check_attention_kwargs(module, {name: object() for name in UNDERSTOOD_ATTENTION_KWARGS})
    check_attention_kwargs(module, {"s_aux": torch.zeros(4), "softcap": 50.0}, num_heads=4)
    with pytest.raises(ValueError, match="output_attentions"):
        check_attention_kwargs(module, {"output_attentions": True})


def test_1_output_attentions_is_refused():
    model = tiny_model("qwen2")
    with ds.patched(model, random_channel_mask(model), SMALL), torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions=True .*attention weights"):
            model(input_ids=torch.tensor([[5, 6, 7]]), output_attentions=True)


def _record_attention_kwargs(model, seen):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from doublesparse.step import dense_attention

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.extend(kwargs.items())
        return dense_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("doublesparse_test_recording", recording)
    AttentionMaskInterface.register("doublesparse_test_recording", sdpa_mask)
    model.set_attn_implementation("doublesparse_test_recording")


# The special ones quick, the others with the slow tests (the matrix of test_architectures runs them all
# through the check anyway).
SPECIAL = ("llama", "gemma3_text", "gpt_oss", "gemma2", "deepseek_v3", "deepseek_v2")


@pytest.mark.parametrize(
    "arch", [arch if arch in SPECIAL else pytest.param(arch, marks=pytest.mark.slow) for arch in MATRIX]
)
def test_1_allowlist_covers_what_each_served_architecture_passes(arch):
    # Every keyword argument these models pass to an attention function, in every way they are run,
    # is on the allowlist, served (sinks, softcap) or None.
    model = tiny_model(arch)
    seen = []
    _record_attention_kwargs(model, seen)
    input_ids, attention_mask = left_padded_batch([9, 6])
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
        model.generate(**kwargs)
        model.generate(**kwargs, num_beams=2)
        model.generate(**{**kwargs, "do_sample": True})
        model.generate(**kwargs, cache_implementation="static")
        model.generate(input_ids=input_ids[:1], max_new_tokens=2, do_sample=False, prompt_lookup_num_tokens=2)
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    names = {name for name, _ in seen}
    understood = set(UNDERSTOOD_ATTENTION_KWARGS) | set(ATTENTION_KWARG_VALUES) | set(SERVED_ATTENTION_KWARGS)
    assert names <= understood | {"dropout", "scaling"}
    module = attention_modules(model, HeadLayout.from_config(model.config))[0]
    check_attention_kwargs(module, {k: v for k, v in seen if k not in ("dropout", "scaling")}, num_heads=4)


def baselines():
    from doublesparse.eval.methods import SelectiveMethod, make_method
    from doublesparse.eval.methods.registry import method_registry

    methods = [make_method(name) for name in method_registry()]
    return [method for method in methods if isinstance(method, SelectiveMethod)]


@pytest.mark.parametrize("arch", ["gpt_oss", "gemma2"])
def test_1_eval_baselines_serve_sinks_and_softcapping(arch):
    # The baselines' selective attention computes them as the model's eager attention does
    # (tests/test_architecture_paths.py checks the results): patching and running succeed.
    model = tiny_model(arch)
    for method in baselines():
        with torch.no_grad(), method.patch(model, SMALL, random_channel_mask(model)):
            model(input_ids=torch.arange(3, 23)[None])
        assert model.config._attn_implementation == "eager", method.name  # restored


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("s_aux", torch.zeros(3), r"LlamaAttention passes s_aux=.*one float logit per query head, shape \[4\]"),
        ("softcap", -30.0, r"LlamaAttention passes softcap=-30.0 .*a positive finite number"),
        ("cu_seq_lens_q", torch.tensor([0, 5]), r"passes cu_seq_lens_q=<tensor \(2,\)> \(packed"),
        ("a_feature_added_later", 1, r"LlamaAttention passes a_feature_added_later=1 \(an attention feature\)"),
    ],
)
def test_1_eval_baselines_check_every_attention_call(name, value, message):
    # Before the fix the baselines' attention handed these to SDPA, which drops them: silently wrong. Sinks
    # and softcaps that are not what gpt-oss and Gemma2 pass are refused like the runtime refuses them.
    model = tiny_model("llama")
    armed = []

    def add_kwarg(module, args, kwargs):
        if armed:
            kwargs[name] = value
        return args, kwargs

    model.model.layers[1].self_attn.register_forward_pre_hook(add_kwarg, with_kwargs=True)
    for method in baselines():
        armed.clear()
        with torch.no_grad(), method.patch(model, SMALL):
            past = model(input_ids=torch.arange(3, 23)[None]).past_key_values
            armed.append(True)
            with pytest.raises(ValueError, match=message):
                model(input_ids=torch.tensor([[5, 6, 7, 8]]))  # a dense prefill
            with pytest.raises(ValueError, match=message):
                model(input_ids=torch.tensor([[9]]), past_key_values=past)  # a sparse decode step


# ---------------------------------------------------------------------------------------------- 2
# Rows after the prompt select like decode steps, in assisted decoding's first round too.


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("selection", ["group", "head"])
def test_2_rows_after_a_past_select_like_token_by_token_decoding(offload, selection):
    model = tiny_model("mistral", num_layers=2)
    config = SMALL.replace(selection=selection, offload=offload, sink_tokens=1)
    tokens = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ds.patched(model, random_channel_mask(model), config):
        cache = ds.make_cache(model)
        model(input_ids=tokens[:, :12], past_key_values=cache)
        one_by_one = torch.cat(
            [model(input_ids=tokens[:, i : i + 1], past_key_values=cache).logits for i in range(12, 20)], 1
        )
        cache = ds.make_cache(model)
        model(input_ids=tokens[:, :12], past_key_values=cache)
        together = model(input_ids=tokens[:, 12:], past_key_values=cache).logits
    with torch.no_grad():
        dense_logits = model(input_ids=tokens).logits[:, 12:]
    assert (together - one_by_one).abs().max() < 1e-5
    assert (together - dense_logits).abs().max() > 1e-2, "the budget must make sparse differ from dense"


@pytest.mark.parametrize("offload", [False, True])
def test_2_assisted_generation_equals_plain_sparse_generation(offload):
    # The assistant (a copy of the model, patched alike) proposes the target's own greedy tokens, so
    # they are accepted, and the first round's draft rows decide them: they must be sparse rows.
    model = tiny_model("llama", num_layers=2)
    assistant = copy.deepcopy(model)
    mask = random_channel_mask(model)
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    config = SMALL.replace(offload=offload)
    with torch.no_grad():
        dense = greedy(model, prompt)
        with ds.patched(model, mask, config), ds.patched(assistant, mask, config):
            plain = greedy(model, prompt)
            assisted = greedy(model, prompt, assistant_model=assistant)
            by_itself = greedy(model, prompt, assistant_model=model)
            looked_up = greedy(model, prompt, prompt_lookup_num_tokens=3)
    assert not torch.equal(dense.sequences, plain.sequences), "the budget must make sparse differ from dense"
    for other in (assisted, by_itself, looked_up):
        assert torch.equal(other.sequences, plain.sequences)
        assert max(float((a - b).abs().max()) for a, b in zip(other.logits, plain.logits)) < 1e-5


def test_2_generate_is_unwrapped_by_remove_and_follows_a_deep_copy():
    model = tiny_model("llama")
    ds.apply(model, random_channel_mask(model), SMALL)
    assert "generate" in model.__dict__
    twin = copy.deepcopy(model)
    assert twin.generate.model is twin and twin.generate.__wrapped__.__self__ is twin
    ds.remove(model)
    assert untouched(model)


# ---------------------------------------------------------------------------------------------- 3
# Mask files whose parts disagree are refused.


def write_mask(path, ranking, layout_dict, statistics=None, **metadata_changes):
    tensors = {"ranking": ranking.to(torch.int32).contiguous()}
    for kind, stat in (statistics or {}).items():
        tensors[f"statistics.{kind}"] = stat.contiguous()
    metadata = {
        "format": "doublesparse.channel_mask",
        "format_version": "1",
        "kind": "qk",
        "per_kv_head": "false",
        "layout": json.dumps(layout_dict),
        "calibration": "{}",
    }
    metadata.update(metadata_changes)
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if v is not None})
    return path


LAYOUT = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "model_type": "llama", "name": "m"}


def good_statistics(seed=0):
    stat = torch.rand(2, 4, 64, generator=torch.Generator().manual_seed(seed))
    return stat, stat.argsort(dim=-1, descending=True, stable=True)


def test_3_statistics_of_another_shape_are_refused(tmp_path):
    # Such statistics used to replace the ranking for GQA with selection="group" (channels 0-15 only).
    stat, ranking = good_statistics()
    path = write_mask(tmp_path / "m.safetensors", ranking, LAYOUT, {"qk": stat[..., :16].contiguous()})
    with pytest.raises(ValueError, match=r"m\.safetensors.*statistics\.qk have shape \(2, 4, 16\)"):
        ChannelMask.load(path)
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="statistics.qk have shape"):
        ds.apply(
            model,
            path,
            ds.SparsityConfig(num_channels=16, selection="group", label_bits=16, sink_tokens=0, recent_tokens=0),
        )


@pytest.mark.parametrize("fault", ["nan", "some nan", "inf", "negative"])
def test_3_non_finite_or_negative_statistics_are_refused(tmp_path, fault):
    stat, ranking = good_statistics()
    bad = {"nan": torch.full_like(stat, float("nan")), "inf": stat.clone().fill_(float("inf"))}.get(fault, stat.clone())
    if fault == "some nan":
        bad[1, 2, 3] = float("nan")
    if fault == "negative":
        bad[0, 0, 63] = -1.0
    path = write_mask(tmp_path / "m.safetensors", ranking, LAYOUT, {"qk": stat, "k": bad})
    with pytest.raises(ValueError, match="NaN or infinite" if fault != "negative" else "negative"):
        ChannelMask.load(path)


def test_3_a_ranking_that_its_statistics_contradict_is_refused(tmp_path):
    stat, ranking = good_statistics()
    path = write_mask(tmp_path / "m.safetensors", ranking.flip(-1), LAYOUT, {"qk": stat})
    with pytest.raises(ValueError, match="does not follow its stored 'qk' statistics"):
        ChannelMask.load(path)
    # Ties may be ordered either way.
    flat = torch.ones(2, 4, 64)
    ChannelMask.load(write_mask(tmp_path / "tied.safetensors", ranking, LAYOUT, {"qk": flat}))


def test_3_a_ranking_stored_as_floats_is_refused(tmp_path):
    _, ranking = good_statistics()
    metadata = {
        "format": "doublesparse.channel_mask",
        "kind": "qk",
        "per_kv_head": "false",
        "layout": json.dumps(LAYOUT),
    }
    save_file({"ranking": ranking.float() + 0.5}, str(tmp_path / "f.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="not integer channel indices"):
        ChannelMask.load(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="integer channel indices"):
        ChannelMask(ranking.float(), "qk", HeadLayout(**{**LAYOUT, "sliding_layers": ()}), False)


@pytest.mark.parametrize("index", [3.7, 3.0, "3", True, None])
def test_3_non_integer_indices_in_the_authors_json_are_refused(tmp_path, index):
    rows = [list(range(8)) for _ in range(2)]
    rows[1][3] = index
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"model.layers.0.self_attn.qk_proj": rows}))
    with pytest.raises(ValueError, match=r"a\.json.*layer 0 .*row 1, position 3: channel index .* is not an integer"):
        ChannelMask.load(path)


# ---------------------------------------------------------------------------------------------- 4
# A model switched to another attention implementation after apply is detected.


def test_4_a_model_switched_to_another_attention_refuses_to_run_dense():
    model = tiny_model("llama")
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        dense = model(input_ids=input_ids).logits
        ds.apply(model, random_channel_mask(model), SMALL)
        model.set_attn_implementation("eager")
        with pytest.raises(ValueError, match=r"switched to attention implementation 'eager'.*doublesparse\.remove"):
            model(input_ids=input_ids)
        with pytest.raises(ValueError, match="switched to attention implementation 'eager'"):
            ds.patch_state(model)
        with pytest.raises(ValueError, match="switched"):
            ds.make_cache(model)
        with pytest.raises(ValueError, match="already patched .*switched"):
            ds.apply(model, random_channel_mask(model))
        # Switching back resumes the patch; remove restores the model either way.
        model.set_attn_implementation("doublesparse")
        assert ds.patch_state(model).config == SMALL
        model.set_attn_implementation("eager")
        ds.remove(model)
        assert untouched(model)
        assert torch.allclose(model(input_ids=input_ids).logits, dense, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 6
# Multi-head latent attention is served (keys and values of their own sizes); what it cannot do is refused.


def test_6_mla_is_served_at_apply_and_calibration():
    model = tiny_model("deepseek_v3")
    layout = HeadLayout.from_config(model.config)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.value_dim) == (4, 4, 48, 32)
    with ds.patched(model, mask_for(model), SMALL), torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=3, do_sample=False)
    mask = calibrate_blocks(model, torch.randint(3, 128, (2, 12)), progress=False)
    assert mask.ranking.shape == (2, 4, 48)


def test_6_mla_in_offload_mode_is_refused_before_any_work():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match=r"DeepseekV3ForCausalLM uses multi-head latent attention.*offload=True"):
        ds.apply(model, mask_for(model), SMALL.replace(offload=True))
    assert untouched(model)


def test_6_values_of_their_own_width_are_served_and_queries_unlike_keys_refused():
    module = tiny_model("llama").model.layers[0].self_attn
    query, key, value = torch.randn(1, 4, 1, 48), torch.randn(1, 2, 5, 48), torch.randn(1, 2, 5, 32)
    out, _ = double_sparse_attention(module, query, key, value, None)
    assert out.shape == (1, 1, 4, 32)
    with pytest.raises(ValueError, match="query heads of 48 channels and key heads of 40"):
        double_sparse_attention(module, query, key[..., :40], value, None)


def test_6_eval_baselines_serve_mla_and_refuse_queries_unlike_keys():
    model = tiny_model("deepseek_v3")
    for method in baselines():
        with torch.no_grad(), method.patch(model, SMALL, random_channel_mask(model)):
            model(input_ids=torch.arange(3, 23)[None])
    from doublesparse.eval.methods.base import selective_attention

    module = tiny_model("llama").model.layers[0].self_attn
    query, key, value = torch.randn(1, 4, 1, 48), torch.randn(1, 2, 5, 48), torch.randn(1, 2, 5, 32)
    out, _ = selective_attention(module, query, key, value, None)
    assert out.shape == (1, 1, 4, 32)
    with pytest.raises(ValueError, match="query heads of 48 channels and key heads of 40"):
        selective_attention(module, query, key[..., :40], value, None)


# ---------------------------------------------------------------------------------------------- 7
# Sparse decoding with gradients enabled gives the right result, differentiably.


def decode_logits(model, prompt, steps=4, *, static=False):
    cache = ds.make_cache(model, 32) if static else ds.make_cache(model)
    out = model(input_ids=prompt, past_key_values=cache)
    logits = []
    for _ in range(steps):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize(
    "changes", [{}, {"label_bits": 4}, {"label_bits": 8, "selection": "head"}, {"offload": True}, {"static": True}]
)
def test_7_sparse_decode_with_gradients_enabled(changes):
    changes = dict(changes)
    static = changes.pop("static", False)
    model = tiny_model("qwen2")
    prompt = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with ds.patched(model, random_channel_mask(model), SMALL.replace(sink_tokens=1, **changes)):
        with torch.no_grad():
            expected = decode_logits(model, prompt, static=static)
        logits = decode_logits(model, prompt, static=static)
        assert (logits.detach() - expected).abs().max() < 1e-5
        if not static:  # a preallocated cache is written in place, as transformers' StaticCache is
            logits.sum().backward()
            grad = model.model.layers[1].self_attn.q_proj.weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_7_sparse_attention_reference_is_differentiable_exactly():
    from doublesparse.kernels.sparse_attention import sparse_attention_reference

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 1, 8, generator=generator, requires_grad=True)
    keys = torch.randn(1, 2, 10, 8, generator=generator, requires_grad=True)
    values = torch.randn(1, 2, 10, 8, generator=generator, requires_grad=True)
    indices = torch.tensor([[[[0, 3, 7]], [[1, 2, 9]]]])
    slot_valid = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    sparse_attention_reference(query, keys, values, indices, slot_valid, 0.3).square().sum().backward()
    got = [t.grad.clone() for t in (query, keys, values)]
    for t in (query, keys, values):
        t.grad = None
    keep = torch.zeros(1, 2, 1, 10, dtype=torch.bool).scatter_(-1, indices, True).repeat_interleave(2, 1)
    logits = (query @ keys.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
    (logits.softmax(-1) @ values.repeat_interleave(2, 1)).square().sum().backward()
    for mine, plain in zip(got, (query.grad, keys.grad, values.grad)):
        assert torch.allclose(mine, plain, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 8
# Int knobs take real ints: floats (4.0) and bools are refused with a message.


@pytest.mark.parametrize("value, message", [(4.0, "4.0 is a float: pass the int 4"), (8.0, "pass the int 8"),
                                            (16.0, "pass the int 16"), (True, "True is a bool")])  # fmt: skip
def test_8_label_bits_must_be_an_int(value, message):
    with pytest.raises(ValueError, match=rf"label_bits={value!r} is invalid: .*{message}"):
        ds.SparsityConfig(label_bits=value, sink_tokens=0, recent_tokens=0)


@pytest.mark.parametrize(
    "field", ["num_channels", "sink_tokens", "recent_tokens", "min_seq_len", "prefetch_warmup_steps"]
)
@pytest.mark.parametrize("value", [2.0, True, "2"])
def test_8_every_int_knob_refuses_floats_bools_and_strings(field, value):
    with pytest.raises(ValueError, match=rf"SparsityConfig\.{field}="):
        ds.SparsityConfig(**{field: value})


@pytest.mark.parametrize("field", ["dense_layers", "sync_layers"])
def test_8_layer_lists_hold_ints(field):
    with pytest.raises(ValueError, match=field):
        ds.SparsityConfig(**{field: [0, 1.0]})
    with pytest.raises(ValueError, match=field):
        ds.SparsityConfig(**{field: [True]})
    with pytest.raises(ValueError, match=field):
        ds.SparsityConfig(**{field: [1, "a"]})  # mixed types: refused, not a TypeError from sorting


def test_8_a_float_token_count_is_refused_saying_to_pass_an_int():
    with pytest.raises(ValueError, match=r"token_budget=64\.0 .*for a token count pass an int"):
        ds.SparsityConfig(token_budget=64.0, label_bits=16, sink_tokens=0, recent_tokens=0)
    assert (
        ds.SparsityConfig(token_budget=1.0, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(10) == 10
    )  # a float is a fraction: 1.0 is all


def test_8_numpy_ints_are_ints():
    numpy = pytest.importorskip("numpy")
    config = ds.SparsityConfig(label_bits=numpy.int64(8), dense_layers=numpy.arange(2), sink_tokens=0, recent_tokens=0)
    assert config.label_bits == 8 and type(config.label_bits) is int and config.dense_layers == (0, 1)


# --------------------------------------------------------------------------------------------- 10
# Malformed mask files raise a ValueError that names the file and what is wrong.


def mask_bytes(tmp_path):
    stat, ranking = good_statistics()
    return write_mask(tmp_path / "good.safetensors", ranking, LAYOUT, {"qk": stat}).read_bytes()


SAFETENSORS_FAULTS = {
    "no ranking tensor": (lambda p: save_file({"statistics.qk": torch.ones(2, 4, 64)}, str(p), metadata={
        "format": "doublesparse.channel_mask", "kind": "qk", "per_kv_head": "false", "layout": json.dumps(LAYOUT)}),
        "no 'ranking' tensor"),
    "empty layout": (lambda p: write_mask(p, good_statistics()[1], {}), r"layout metadata lacks \['num_layers'"),
    "partial layout": (lambda p: write_mask(p, good_statistics()[1], {"num_layers": 2}), "layout metadata lacks"),
    "layout not json": (lambda p: write_mask(p, good_statistics()[1], LAYOUT, layout="{oops"), "not valid JSON"),
    "layout of strings": (lambda p: write_mask(p, good_statistics()[1], {**LAYOUT, "num_heads": "4"}), "positive int"),
    "layout not the tensor's": (lambda p: write_mask(p, good_statistics()[1], {**LAYOUT, "num_layers": 3}),
                                "the mask's layout says"),
    "bad kind": (lambda p: write_mask(p, good_statistics()[1], LAYOUT, kind="v"), "mask kind 'v'"),
    "bad per_kv_head": (lambda p: write_mask(p, good_statistics()[1], LAYOUT, per_kv_head='"yes"'), "true or false"),
    "calibration not an object": (lambda p: write_mask(p, good_statistics()[1], LAYOUT, calibration="[1]"),
                                  "calibration metadata must be a JSON object"),
    "newer format": (lambda p: write_mask(p, good_statistics()[1], LAYOUT, format_version="9"), "upgrade"),
    "no format": (lambda p: save_file({"weight": torch.ones(2)}, str(p)), "not a doublesparse channel mask"),
    "unknown tensor": (lambda p: save_file({"ranking": good_statistics()[1].int(), "extra": torch.ones(1)}, str(p),
                                           metadata={"format": "doublesparse.channel_mask", "kind": "qk",
                                                     "per_kv_head": "false", "layout": json.dumps(LAYOUT)}),
                       "holds a tensor 'extra'"),
    "empty file": (lambda p: p.write_bytes(b""), "too short for a header"),
    "truncated": (lambda p: p.write_bytes(mask_bytes(p.parent)[:-100]), "truncated"),
    "garbage": (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 40), "header is not JSON"),
    "text file": (lambda p: p.write_text("hello, this is not a mask at all"), "not a complete safetensors file"),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(SAFETENSORS_FAULTS))
def test_10_malformed_safetensors_masks_name_the_file(tmp_path, fault):
    make, message = SAFETENSORS_FAULTS[fault]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=message) as error:
        ChannelMask.load(path)
    assert str(path) in str(error.value)


ROWS = [list(range(8)), list(range(7, -1, -1))]
JSON_FAULTS = {
    "list at top level": ('[["model.layers.0.self_attn.qk_proj", [[0, 1]]]]', "JSON list at top level"),
    "layer key not a number": (json.dumps({"model.layers.x.self_attn.qk_proj": ROWS}), "entry 'model.layers.x"),
    "other key": (json.dumps({"model.layers.0.self_attn.qk_proj": ROWS, "note": "hi"}), "entry 'note'"),
    "layers not 0..n-1": (json.dumps({"model.layers.1.self_attn.qk_proj": ROWS}), r"are \[1\], not numbered 0..0"),
    "empty rows": (json.dumps({"model.layers.0.self_attn.qk_proj": []}), "non-empty list of rows"),
    "empty row": (json.dumps({"model.layers.0.self_attn.qk_proj": [[]]}), "non-empty list of channel indices"),
    "rows not lists": (json.dumps({"model.layers.0.self_attn.qk_proj": {"a": 1}}), "list of rows"),
    "string indices": (json.dumps({"model.layers.0.self_attn.qk_proj": [["0", "1"]]}), "is not an integer"),
    "ragged rows": (json.dumps({"model.layers.0.self_attn.qk_proj": [[0, 1, 2], [0, 1]]}), "ragged rows"),
    "layers of other shapes": (json.dumps({"model.layers.0.self_attn.qk_proj": ROWS,
                                           "model.layers.1.self_attn.qk_proj": [ROWS[0]]}), "but layer 0 has 2 rows"),
    "not a permutation": (json.dumps({"model.layers.0.self_attn.qk_proj": [[0, 0, 1, 2]]}), "not a permutation"),
    "index out of range": (json.dumps({"model.layers.0.self_attn.qk_proj": [[0, 1, 2, 9]]}), "out of range"),
    "huge index": (json.dumps({"model.layers.0.self_attn.qk_proj": [[0, 1, 2, 10**30]]}), "far out of range"),
    "invalid json": ('{"model.layers.0.self_attn.qk_proj": [[0, 1]', "not valid JSON"),
    "no such kind": (json.dumps({"model.layers.0.self_attn.k_proj": ROWS}), r"no 'qk_proj' entries \(it has \['k'\]\)"),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(JSON_FAULTS))
def test_10_malformed_authors_json_names_the_file(tmp_path, fault):
    text, message = JSON_FAULTS[fault]
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        ChannelMask.load(path)
    assert str(path) in str(error.value)


def test_10_invalid_utf8_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"model.layers.0.self_attn.qk_proj": [[0, 1]], "\xff": 1}')
    with pytest.raises(ValueError, match=r"bad\.json' is not UTF-8 text"):
        ChannelMask.load(path)


@pytest.mark.parametrize("channels", [5, None, 3.5, ["channels.safetensors"], {"qk": 1}])
def test_10_apply_with_something_that_is_not_a_mask(channels):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="channels must be a ChannelMask or the path of a channel mask file"):
        ds.apply(model, channels)
    assert untouched(model)


# --------------------------------------------------------------------------------------------- 11
# An authors' JSON loaded without a layout is resolved against the model.


def authors_qk_file(tmp_path, model):
    mask = random_channel_mask(model)  # one row per query head, as the authors write qk
    path = tmp_path / "authors.json"
    path.write_text(json.dumps({f"model.layers.{i}.self_attn.qk_proj": mask.ranking[i].tolist() for i in range(2)}))
    return path


def test_11_qk_only_authors_json_loaded_without_layout_fits_a_gqa_model(tmp_path):
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    path = authors_qk_file(tmp_path, model)
    guessed = ChannelMask.load(path)
    assert guessed.layout_inferred and guessed.layout.num_kv_heads == 4  # MHA was the only guess
    layout = HeadLayout.from_config(model.config)
    resolved = guessed.for_model(layout)
    assert not resolved.per_kv_head and resolved.layout == layout
    assert torch.equal(resolved.ranking, ChannelMask.load(path, layout=layout).ranking)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        with ds.patched(model, guessed, SMALL):
            from_guess = greedy(model, prompt).sequences
        with ds.patched(model, ChannelMask.load(path, layout=layout), SMALL):
            from_layout = greedy(model, prompt).sequences
    assert torch.equal(from_guess, from_layout)


def test_11_the_messages_name_the_real_fix(tmp_path):
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    guessed = ChannelMask.load(authors_qk_file(tmp_path, model))
    layout = HeadLayout.from_config(model.config)
    kv_only = HeadLayout(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"guessed: load it with ChannelMask\.load\(path, layout=HeadLayout"):
        guessed.validate(kv_only)
    with pytest.raises(ValueError, match="layout=HeadLayout.from_config"):
        guessed.save(tmp_path / "m.safetensors")
    guessed.for_model(layout).save(tmp_path / "m.safetensors")  # once resolved, it saves


# --------------------------------------------------------------------------------------------- 12
# Models are identified by something stable, and a mismatch is noted once.


def test_12_the_shipped_mask_records_no_absolute_path():
    from doublesparse.default_model import default_model_path

    mask = ChannelMask.load(default_model_path() / "channels.safetensors")
    recorded = [mask.layout.name, *(str(v) for v in mask.calibration.values())]
    assert not any(value.startswith("/") or "/work/" in value for value in recorded), recorded
    config = transformers.AutoConfig.from_pretrained(default_model_path())
    assert mask.layout.name == "default_model"
    assert mask.calibration["model_fingerprint"] == shape_fingerprint(config)


def test_12_a_mask_from_another_model_is_noted_once_per_pair(caplog):
    import doublesparse.channels as channels

    model = tiny_model("llama")
    layout = HeadLayout.from_config(model.config)
    stat = torch.rand(2, 4, 16, generator=torch.Generator().manual_seed(0))
    ranking = stat.argsort(dim=-1, descending=True, stable=True)

    def mask(name, fingerprint=None):
        calibration = {"model": name} if fingerprint is None else {"model": name, "model_fingerprint": fingerprint}
        return ChannelMask(
            ranking, "qk", HeadLayout(**{**layout.__dict__, "name": name}), False, {"qk": stat}, calibration
        )

    channels._WARNED_PAIRS.clear()
    model.config._name_or_path = "/some/machine/models/tiny-llama"
    with caplog.at_level(logging.WARNING, logger="doublesparse.channels"):
        for _ in range(3):
            ds.remove(ds.apply(model, mask("/another/machine/tiny-llama", shape_fingerprint(model.config)), SMALL))
        assert "calibrated on" not in caplog.text  # same model, wherever it lives
        for _ in range(3):
            ds.remove(ds.apply(model, mask("other-model"), SMALL))
        assert caplog.text.count("calibrated on 'other-model'") == 1
        ds.remove(ds.apply(model, mask("tiny-llama", "0123456789abcdef"), SMALL))
        assert caplog.text.count("of other weight shapes") == 1


def test_12_calibration_records_the_model_by_name_and_shape_fingerprint():
    from tiny_tokenizer import sample_texts, tiny_tokenizer

    model = tiny_model("llama")
    model.config._name_or_path = "/home/someone/models/tiny-llama/"
    mask = ds.calibrate(model, tiny_tokenizer(), sample_texts(4), num_samples=2, seq_len=16, progress=False)
    assert mask.layout.name == mask.calibration["model"] == "tiny-llama"
    assert mask.calibration["model_fingerprint"] == shape_fingerprint(model.config)


# --------------------------------------------------------------------------------------------- 13
# `doublesparse --help` and building its parser import neither torch nor transformers.

HEAVY_MODULES = ("torch", "transformers", "matplotlib")


def test_13_building_the_parser_and_every_commands_help_import_nothing_heavy():
    code = f"""
import sys
import doublesparse.cli as cli
from doublesparse.eval.commands.bench import BENCHMARKS

cli.build_parser()
helps = [["--help"]] + [[name, "--help"] for name in cli.SUBCOMMANDS] + [["bench", b, "--help"] for b in BENCHMARKS]
for argv in helps:
    try:
        cli.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
print(" ".join(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)) or "none")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "none"


def test_13_doublesparse_help_as_a_command_imports_nothing_heavy():
    script = Path(sys.executable).parent / "doublesparse"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "doublesparse.cli"]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    started = time.perf_counter()
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - started
    print(f"`doublesparse --help` took {seconds:.2f} s")  # the machine is shared: asserted on modules, not time
    assert result.returncode == 0 and "usage: doublesparse" in result.stdout, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "doublesparse.cli" in imported
    assert not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))


# --------------------------------------------------------------------------------------------- 14
# Small ones: what the runtime and the calibrate command say, and when.


def test_14_a_folder_given_as_the_mask_is_called_a_folder(tmp_path):
    (tmp_path / "channels.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a folder, not a mask file: pass the file itself \(it holds channels"):
        ChannelMask.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ChannelMask.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "size, text", [(0, "0 B"), (640, "640 B"), (5000, "4.88 KiB"), (3 << 20, "3.00 MiB"), (5 << 30, "5.00 GiB")]
)
def test_14_byte_counts_read_in_a_unit_that_fits(size, text):
    from doublesparse.offload import format_bytes

    assert format_bytes(size) == text


def test_14_host_memory_errors_of_small_sizes_read_in_kib():
    from doublesparse.offload import HostMemoryBudget

    with pytest.raises(ValueError, match=r"needs 4\.88 KiB of host memory, more than the 1000 B allowed"):
        HostMemoryBudget(1000).reserve({0: 5000}, "a test")


def test_14_an_offload_cache_that_cannot_fit_is_refused_at_make_cache():
    model = tiny_model("llama")
    with ds.patched(model, random_channel_mask(model), SMALL.replace(offload=True)):
        with pytest.raises(ValueError, match=r"batch 1 x 1000000000000 tokens \(batch 1, the least any batch"):
            ds.make_cache(model, max_cache_len=10**12)


def calibrate_args(argv):
    from doublesparse.calibration import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command, parser.parse_args(argv)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the calibrate command reads data or loads a model."""
    from doublesparse.calibration import command, data

    def refuse(*args, **kwargs):
        raise AssertionError("the command started work before checking its arguments")

    monkeypatch.setattr(data, "read_documents", refuse)
    monkeypatch.setattr(command, "load_model", refuse)


def test_14_field_and_split_are_refused_for_text_data(tmp_path, no_work):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text", encoding="utf-8")
    out = str(tmp_path / "c.safetensors")
    command, args = calibrate_args(["--data", str(corpus), "--field", "body", "--out", out])
    with pytest.raises(ValueError, match="--field picks the text field .* plain text, read whole: drop --field"):
        command.run(args)
    command, args = calibrate_args(["--data", str(corpus), "--split", "test", "--out", out])
    with pytest.raises(ValueError, match="--split picks a split of a dataset"):
        command.run(args)


def not_a_model_folders(tmp_path):
    """Folders (and a file) given as --model that hold no model transformers could load, and what is said."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(transformers.LlamaConfig().to_dict()))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((config_only / "config.json").read_text())
    (no_tokenizer / "model.safetensors").write_bytes(b"")
    return [
        (
            notes,
            r"is a folder without config\.json, not a transformers model folder: pass the folder that save_pretrained",
        ),
        (config_only, r"holds config\.json but no weights \(\*\.safetensors or \*\.bin\)( and no tokenizer)?"),
        (no_tokenizer, r"holds config\.json but no tokenizer \(tokenizer\.json, tokenizer_config\.json"),
        (notes / "readme.txt", r"is a file: pass the model's folder \(what save_pretrained wrote\)"),
    ]


@pytest.mark.parametrize("command", [EVAL, RECALL, BENCH_CALIBRATION], ids=lambda argv: " ".join(argv[:2]))
def test_14_a_folder_that_holds_no_model_is_named_before_work(tmp_path, no_eval_work, capsys, command):
    # Before: "Unrecognized model ... Should have a `model_type` key", or a traceback from the tokenizer or weights.
    for folder, message in not_a_model_folders(tmp_path):
        if command is BENCH_CALIBRATION and folder.name == "no-tokenizer":
            continue  # this benchmark draws random token ids: it needs no tokenizer
        argv = [*command, "--model", folder] + (
            ["--out", tmp_path / "r.json"] if command is not BENCH_CALIBRATION else []
        )
        refused(capsys, argv, rf"--model '{re.escape(str(folder))}' {message}")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--method", "dense,h2o", "--channels", "mask.safetensors"],
         r"--channels is read by the methods that use a channel mask \(double_sparsity\) only, and --method runs "
         r"dense, h2o: drop --channels \(it would be ignored\)"),
        (["--method", "dense,h2o", "--page-size", "8"], r"--page-size is read by quest only, and --method runs dense"),
        (["--method", "oracle_topk", "--kind", "q"], r"--kind is read by double_sparsity only"),
        (["--method", "quest,h2o", "--label-bits", "8"], r"--label-bits is read by double_sparsity, random_channels"),
        (["--method", "dense", "--sink-tokens", "2"], r"--sink-tokens is read by the sparse methods only, and --meth"),
        (["--task", "passkey", "--num-lines", "40"], r"--num-lines is read by kv_retrieval only, and --task runs pass"),
        (["--task", "kv_retrieval", "--window", "64"], r"--window is read by perplexity only, and --task runs kv_retr"),
        (["--task", "perplexity", "--num-samples", "3"],
         r"--num-samples is read by kv_retrieval, lm_eval:<task>, needle, passkey only, and --task runs perplexity"),
        (["--method", "sparq", "--labels", "projection"], r"--labels is read by double_sparsity only"),
        (["--task", "passkey", "--num-needles", "2"], r"--num-needles is read by needle only, and --task runs passkey"),
        (["--task", "needle", "--protocol", "every-position"], r"--protocol is read by perplexity only"),
        (["--task", "passkey", "--continuation-tokens", "32"],
         r"--continuation-tokens is read by perplexity only, and --task runs passkey"),
    ],
)  # fmt: skip
def test_14_eval_options_that_no_task_or_method_reads_are_refused(no_eval_work, capsys, options, message):
    channels = [] if "--method" in options else ["--channels", "calibrate"]  # the default methods need a mask
    refused(capsys, ["eval", "--model", "tiny-random", *channels, *options], message)


def test_14_eval_refuses_a_journal_it_could_not_write(no_eval_work, capsys, tmp_path):
    # Every sample goes to the .jsonl beside --out as it is measured: a folder there fails before any work.
    (tmp_path / "r.jsonl").mkdir()
    argv = ["eval", "--model", "tiny-random", "--task", "passkey", "--method", "dense", "--out", tmp_path / "r.json"]
    refused(capsys, argv, r"--out's journal '.*r\.jsonl' is a folder")


def test_14_passkey_does_not_take_kv_retrievals_num_lines():
    # Before: passkey took --num-lines, ignored it, and its result file said `num_lines: 40, context_length: None`.
    from doublesparse.eval.commands import evaluate
    from doublesparse.eval.commands.checks import check_options_used

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = ["--model", "tiny-random", "--channels", "calibrate", "--task", "kv_retrieval,passkey", "--num-lines", "40"]
    args = parser.parse_args(argv + ["--context-length", "256"])
    plan = evaluate.plan_from_args(args)
    check_options_used(args, plan)  # kv_retrieval reads --num-lines, passkey --context-length
    kv, passkey = plan.spec.tasks
    assert kv.settings()["num_lines"] == 40
    assert passkey.settings()["num_lines"] is None and passkey.settings()["context_length"] == 256


def test_14_bench_and_inspect_options_that_would_be_ignored_are_refused(tmp_path, no_eval_work, capsys):
    refused(capsys, ["bench", "decode", "--compile-mode", "reduce-overhead"],
            "--compile-mode 'reduce-overhead' is a mode of torch.compile: add --compile")  # fmt: skip
    stat, ranking = good_statistics()
    good = write_mask(tmp_path / "good.safetensors", ranking, LAYOUT, {"qk": stat})
    refused(capsys, ["inspect", good, "--layer", "0"],
            r"--layer picks the layer to plot: add --plot FILE \(the tables always show every layer\)")  # fmt: skip


def test_14_doublesparse_with_no_command_prints_usage_and_exits_2(capsys):
    from doublesparse.cli import main

    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: doublesparse" in captured.err and "name a command" in captured.err


# ---------------------------------------------------------------------------------------------- 9
# Every command checks its outputs, device and model before work; Ctrl-C exits quietly, leaving whole files.


def unwritable_folder(tmp_path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if not Path("/proc").is_dir():
        pytest.skip("as root, only a read-only file system (/proc) is unwritable")
    return Path("/proc")


def test_9_unwritable_out_is_refused_before_work(tmp_path, no_work):
    command, args = calibrate_args(["--out", str(unwritable_folder(tmp_path) / "sub" / "c.safetensors")])
    with pytest.raises(ValueError, match="--out .* cannot be written: no file can be created in"):
        command.run(args)


def test_9_out_under_a_file_is_refused_before_work(tmp_path, no_work):
    (tmp_path / "notes.txt").write_text("a file")
    command, args = calibrate_args(["--out", str(tmp_path / "notes.txt" / "c.safetensors")])
    with pytest.raises(ValueError, match=r"notes\.txt' is a file, not a folder"):
        command.run(args)
    command, args = calibrate_args(["--out", str(tmp_path / "x.safetensors"), "--format", "json"])
    (tmp_path / "x.json").mkdir()
    with pytest.raises(ValueError, match=r"its \.json beside it\) .*x\.json' is a folder"):
        command.run(args)


@pytest.mark.parametrize(
    "device, message", [("bogus", "is not a device: use cpu, cuda"), ("cuda:7", "no cuda device|has .* cuda device")]
)
def test_9_devices_this_machine_lacks_are_refused_before_work(tmp_path, no_work, device, message):
    command, args = calibrate_args(["--device", device, "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(ValueError, match=message):
        command.run(args)


def test_9_cuda_on_a_machine_without_it(tmp_path, no_work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command, args = calibrate_args(["--device", "cuda", "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(
        ValueError, match="--device 'cuda': this machine has no cuda device available: use --device cpu"
    ):
        command.run(args)


def test_9_a_model_folder_without_a_config_is_refused(tmp_path, no_work):
    command, args = calibrate_args(["--model", str(tmp_path), "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(ValueError, match="folder without config.json, not a transformers model folder"):
        command.run(args)


def inspect_args(argv):
    from doublesparse.calibration import inspect_command

    parser = argparse.ArgumentParser()
    inspect_command.add_arguments(parser)
    return inspect_command, parser.parse_args(argv)


def test_9_inspect_refuses_an_unwritable_plot_and_a_non_mask_file(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(3)}, str(weights))
    command, args = inspect_args([str(weights)])
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a doublesparse channel mask"):
        command.run(args)
    stat, ranking = good_statistics()
    good = write_mask(tmp_path / "good.safetensors", ranking, LAYOUT, {"qk": stat})
    monkeypatch.setattr(ChannelMask, "load", None)  # the plot path is checked before the mask is read
    for plot, message in [(unwritable_folder(tmp_path) / "p.png", "--plot .* cannot be written"),
                          (tmp_path / "p.xyz", "images are written as png")]:  # fmt: skip
        command, args = inspect_args([str(good), "--plot", str(plot)])
        with pytest.raises(ValueError, match=message):
            command.run(args)


def test_9_ctrl_c_exits_quietly_with_130(monkeypatch, capsys):
    from doublesparse.calibration import inspect_command
    from doublesparse.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_command, "run", interrupted)
    assert main(["inspect", "channels.safetensors"]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err


def unwritable_outputs(tmp_path):
    """(argv, message) of every evaluation command given an output in a place no file can be created."""
    locked = unwritable_folder(tmp_path)
    cannot = "cannot be written: no file can be created in"
    return [
        (EVAL + ["--out", locked / "r.json"], f"--out .* {cannot}"),
        (EVAL + ["--csv", locked / "r.csv"], f"--csv .* {cannot}"),
        (EVAL + ["--plot", locked / "r.png"], f"--plot .* {cannot}"),
        (RUN + ["--out-dir", locked / "run"], f"--out-dir .* {cannot}"),
        (RECALL + ["--out", locked / "r.json"], f"--out .* {cannot}"),
        *[(bench + ["--out-dir", locked / "b"], f"--out-dir .* {cannot}") for bench in BENCHES],
        (BENCH_CALIBRATION + ["--json", locked / "c.json"], f"--json .* {cannot}"),
    ]


def test_9_eval_commands_refuse_an_unwritable_output_before_work(tmp_path, no_eval_work, capsys):
    for argv, message in unwritable_outputs(tmp_path):
        refused(capsys, argv, message)


def test_9_eval_commands_refuse_outputs_under_a_file_or_at_a_folder(tmp_path, no_eval_work, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    folder = tmp_path / "taken"
    for name in ("r.csv", "results.png", "channels.safetensors", "bench_kernels.png", "bench_decode.json"):
        (folder / name).mkdir(parents=True)
    under_a_file = r"notes\.txt' is a file, not a folder"
    cases = [
        (EVAL + ["--out", notes / "r.json"], f"--out .*{under_a_file}"),
        (EVAL + ["--out", folder], r"--out .*taken' is a folder: name the file to write"),
        (EVAL + ["--out", folder / "r.json", "--csv"], r"--csv .*r\.csv' is a folder: name the file to write"),
        (EVAL + ["--plot", notes / "p.png"], f"--plot .*{under_a_file}"),
        (EVAL + ["--plot", tmp_path / "p.xyz"], r"--plot .*p\.xyz': images are written as png, pdf, svg"),
        (RUN + ["--out-dir", notes], r"--out-dir .*notes\.txt' is a file: name a folder to write the results into"),
        (RUN + ["--out-dir", folder], r"results\.png' is a folder, where the file results\.png goes"),
        (RECALL + ["--out", folder], r"--out .*taken' is a folder: name the file to write"),
        (RECALL + ["--out", notes / "r.json"], f"--out .*{under_a_file}"),
        (BENCHES[0] + ["--out-dir", folder], r"bench_kernels\.png' is a folder, where the file bench_kernels\.png"),
        (BENCHES[1] + ["--out-dir", folder], r"bench_decode\.json' is a folder, where the file bench_decode\.json"),
        (BENCHES[2] + ["--out-dir", notes / "b"], f"--out-dir .*{under_a_file}"),
        (BENCH_CALIBRATION + ["--json", folder], r"--json .*taken' is a folder: name the file to write"),
    ]
    for argv, message in cases:
        refused(capsys, argv, message)
    # The tiny stand-in is calibrated now and its mask saved beside the results: that file is checked too.
    (folder / "results.png").rmdir()
    refused(capsys, RUN + ["--out-dir", folder], r"channels\.safetensors' is a folder, where the file channels")
    # Without a plot, the plot's place is not checked: the benchmark goes on to its work.
    from doublesparse.cli import main

    with pytest.raises(AssertionError, match="started work"):
        main(["bench", "kernels", "--no-plot", "--device", "cpu", "--out-dir", str(folder)])


@pytest.mark.parametrize("command", [RECALL, *BENCHES, BENCH_CALIBRATION], ids=lambda argv: " ".join(argv[:2]))
def test_9_eval_commands_refuse_devices_this_machine_lacks(tmp_path, no_eval_work, capsys, command):
    refused(capsys, command + ["--device", "bogus"], "--device 'bogus' is not a device: use cpu, cuda, cuda:N or mps")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        refused(capsys, command + ["--device", f"cuda:{count}"], f"this machine has {count} cuda device")
    else:
        refused(
            capsys, command + ["--device", "cuda"],
            "--device 'cuda': this machine has no cuda device available: use --device cpu",
        )  # fmt: skip


class Interrupting:
    """A value whose text is asked for mid-write: Ctrl-C arrives then."""

    def __str__(self) -> str:
        raise KeyboardInterrupt


@pytest.fixture
def interrupted_writes(monkeypatch):
    """Path.write_text and Figure.savefig write part of their file, then Ctrl-C arrives."""
    import matplotlib.figure

    write_text = Path.write_text

    def half_then_interrupt(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    def savefig_then_interrupt(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_then_interrupt)


def result_rows():
    row = {"task": "perplexity", "method": "dense", "sparsity": None, "sparsity_label": "dense",
           "metric": "perplexity", "value": 3.5, "seconds": 0.1, "config": None}  # fmt: skip
    return [row, {**row, "method": "h2o", "sparsity": 0.25, "sparsity_label": "1/4"}]


def interrupted_writers():
    from doublesparse.eval.bench.common import pyplot, save_figure, write_report
    from doublesparse.eval.harness.results import plot_results, write_csv, write_json
    from doublesparse.output_paths import write_text

    def figure():
        return pyplot().subplots()[0]

    return {
        "results.json": lambda path: write_json({"results": result_rows()}, path),
        "results.csv": lambda path: write_csv(
            [*result_rows(), {**result_rows()[0], "value": Interrupting()}], path, 0, "m"
        ),
        "results.png": lambda path: plot_results(result_rows(), path, "title"),
        "results.md": lambda path: write_text(path, "| a | table |\n" * 100),
        "bench_kernels.json": lambda path: write_report({"results": list(range(100))}, path),
        "bench_kernels.png": lambda path: save_figure(figure(), path),
    }


@pytest.mark.parametrize("name", list(interrupted_writers()))
def test_9_ctrl_c_while_writing_a_result_leaves_the_previous_file_whole(tmp_path, interrupted_writes, name):
    target = tmp_path / name
    target.write_bytes(b"the previous results")
    with pytest.raises(KeyboardInterrupt):
        interrupted_writers()[name](target)
    assert target.read_bytes() == b"the previous results"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_9_ctrl_c_during_eval_exits_130_leaving_only_whole_files(tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    from doublesparse.cli import main

    def savefig_then_interrupt(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_then_interrupt)
    small = ["--method", "dense", "--task", "perplexity", "--window", "32", "--num-windows", "1"]
    argv = ["eval", "--model", "tiny-random", "--no-progress", *small, "--out", str(tmp_path / "r.json"), "--csv"]
    assert main(argv + ["--plot", str(tmp_path / "r.png")]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["method"] == "dense"  # written before the plot
    # No half plot, no temporary file; the journal holds the samples measured before the interrupt.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json", "r.jsonl"]

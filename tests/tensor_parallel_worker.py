"""One rank of the tensor-parallel test (launched by tests/test_tensor_parallel.py through torchrun).

Every rank loads the saved tiny model twice: with transformers' tensor parallelism (`tp_plan="auto"`,
gloo on CPU) and whole, as a single process would. Each case patches both with the same mask and
config and decodes the same left-padded batch; the rank writes, per case, whether the tokens are equal
and how far apart the logits are, to `<out>/rank<r>.json`. Calibration under TP is compared with
single-process calibration; a mask made of one rank's rows and a model whose KV heads do not split
over the ranks must fail with a ValueError naming the rank.

Usage: torchrun --nproc-per-node 2 tests/tensor_parallel_worker.py MODEL_DIR SPLIT_DIR FUSED_DIR OUT_DIR
(MODEL_DIR: 4 query / 2 KV heads; SPLIT_DIR: one KV head, which cannot split over 2 ranks; FUSED_DIR: a
Phi-3, whose fused qkv projection transformers shards and gathers back.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers import AutoModelForCausalLM  # noqa: E402

import doublesparse as ds  # noqa: E402
from doublesparse.calibration import calibrate_blocks  # noqa: E402
from doublesparse.decode import StaticDecoder  # noqa: E402

from tiny_models import left_padded_batch, random_channel_mask  # noqa: E402

NEW_TOKENS = 6
CASES = {
    # name: (decode loop, SparsityConfig fields)
    "group_int4_budget6": ("generate", dict(selection="group", label_bits=4, num_channels=4, token_budget=6)),
    "head_int4_budget6": ("generate", dict(selection="head", label_bits=4, num_channels=4, token_budget=6)),
    "group_fp16_quarter": ("generate", dict(selection="group", label_bits=16, num_channels=6, token_budget=0.25)),
    "head_int4_static": ("static", dict(selection="head", label_bits=4, num_channels=4, token_budget=6)),
    "group_int4_static": ("static", dict(selection="group", label_bits=4, num_channels=4, token_budget=6)),
    "group_int4_offload": (
        "generate",
        dict(selection="group", label_bits=4, num_channels=4, token_budget=6, offload=True, prefetch=True),
    ),
}


def decode(model, loop: str, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, N] and the logits that chose them [B, N, V]."""
    if loop == "static":
        result = StaticDecoder(model, max_cache_len=input_ids.shape[1] + NEW_TOKENS).generate(
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


def run_case(sharded, whole, mask, shard, loop, fields, input_ids, attention_mask) -> dict:
    """Decode with the single-process and the sharded patched model; how equal they are."""
    config = ds.SparsityConfig(sink_tokens=1, recent_tokens=2, **fields)
    with ds.patched(whole, mask, config), torch.no_grad():
        want_tokens, want_logits = decode(whole, loop, input_ids, attention_mask)
    with ds.patched(sharded, mask, config), torch.no_grad():
        plan = ds.patch.patch_state(sharded).plans[0]
        got_tokens, got_logits = decode(sharded, loop, input_ids, attention_mask)
    return {
        "tokens_equal": bool(torch.equal(want_tokens, got_tokens)),
        "max_logit_diff": float((want_logits - got_logits).abs().max()),
        "plan_heads": [plan.num_heads, plan.num_kv_heads, plan.num_select_heads],
        "plan_channels_equal": bool(torch.equal(plan.channels, _expected_rows(mask, config, shard, whole.config))),
    }


def error_of(function) -> str:
    """The message of the ValueError `function()` raises, or '' if it raises none."""
    try:
        function()
    except ValueError as error:
        return str(error)
    return ""


def main() -> None:
    model_dir, split_dir, fused_dir, out_dir = sys.argv[1:5]
    torch.manual_seed(0)
    sharded = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rank = torch.distributed.get_rank()
    mask = random_channel_mask(whole, seed=3)
    input_ids, attention_mask = left_padded_batch([40, 33], seed=1)
    report: dict = {"rank": rank, "world_size": torch.distributed.get_world_size(), "cases": {}}
    # Which global heads this rank holds, checked independently of the shard metadata: its projection
    # weights are exactly those rows of the whole model's.
    shard = ds.sharding.head_shards(sharded, ds.support.attention_modules(sharded, _layout(whole)), _layout(whole))[0]
    head_dim = _layout(whole).head_dim
    local_q = sharded.model.layers[0].self_attn.q_proj.weight.to_local()
    local_k = sharded.model.layers[0].self_attn.k_proj.weight.to_local()
    whole_attention = whole.model.layers[0].self_attn
    report["heads"] = [shard.q_start, shard.q_stop, shard.kv_start, shard.kv_stop]
    report["heads_match_weights"] = bool(
        torch.equal(local_q, whole_attention.q_proj.weight[shard.q_start * head_dim : shard.q_stop * head_dim])
        and torch.equal(local_k, whole_attention.k_proj.weight[shard.kv_start * head_dim : shard.kv_stop * head_dim])
    )

    for name, (loop, fields) in CASES.items():
        try:
            report["cases"][name] = run_case(sharded, whole, mask, shard, loop, fields, input_ids, attention_mask)
        except Exception as error:  # recorded, so that every case is reported, and the test fails on it
            report["cases"][name] = {"error": f"{type(error).__name__}: {error}"}

    # Calibration: statistics gathered over the ranks give the single-process mask.
    blocks = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    single = calibrate_blocks(whole, blocks, batch_size=2, progress=False)
    gathered = calibrate_blocks(sharded, blocks, batch_size=2, progress=False)
    report["calibration"] = {
        "ranking_equal": bool(torch.equal(single.ranking, gathered.ranking)),
        "max_statistic_rel_diff": max(
            float(
                (
                    (single.statistics[k] - gathered.statistics[k]).abs() / single.statistics[k].abs().clamp_min(1e-12)
                ).max()
            )
            for k in single.statistics
        ),
        "tokens": [single.calibration["tokens"], gathered.calibration["tokens"]],
    }

    # A fused qkv projection whose output transformers gathers (Phi-3's plan): every rank sees every head.
    fused_sharded = AutoModelForCausalLM.from_pretrained(fused_dir, tp_plan="auto", dtype=torch.float32).eval()
    fused_whole = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32).eval()
    fused_mask = random_channel_mask(fused_whole, seed=4)
    fields = dict(selection="group", label_bits=4, num_channels=4, token_budget=6)
    try:
        report["fused_gathered"] = run_case(
            fused_sharded, fused_whole, fused_mask, None, "generate", fields, input_ids, attention_mask
        )
    except Exception as error:
        report["fused_gathered"] = {"error": f"{type(error).__name__}: {error}"}
    prefetch = ds.SparsityConfig(
        num_channels=4, offload=True, prefetch=True, label_bits=16, sink_tokens=0, recent_tokens=0
    )
    report["fused_prefetch_error"] = error_of(lambda: ds.apply(fused_sharded, fused_mask, prefetch))

    # A mask of one rank's rows only does not fit: the error names the rank and the head counts.
    # (Its layout says what it holds, a rank's 2 query / 1 KV heads, as a mask calibrated on one rank would.)
    whole_layout = ds.HeadLayout.from_config(whole.config)
    rank_layout = dataclasses.replace(whole_layout, num_heads=2, num_kv_heads=1)
    local = ds.ChannelMask(mask.ranking[:, :2], "qk", rank_layout, per_kv_head=False)
    report["local_mask_error"] = error_of(
        lambda: ds.apply(
            sharded, local, ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0)
        )
    )
    # A model whose single KV head cannot split over two ranks is refused before anything is patched.
    split = AutoModelForCausalLM.from_pretrained(split_dir, tp_plan="auto", dtype=torch.float32).eval()
    split_mask = random_channel_mask(AutoModelForCausalLM.from_pretrained(split_dir, dtype=torch.float32))
    report["split_head_error"] = error_of(
        lambda: ds.apply(
            split, split_mask, ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0)
        )
    )
    report["split_head_untouched"] = not ds.patch.is_patched(split)

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _layout(model) -> "ds.HeadLayout":
    return ds.HeadLayout.from_config(model.config)


def _expected_rows(mask, config, shard, model_config) -> torch.Tensor:
    """This rank's channel rows, sliced from the whole model's plan by the rank's global head indices."""
    layout = ds.HeadLayout.from_config(model_config)
    whole_rows = ds.plan.layer_plans(mask, config, layout)[0].channels
    if shard is None:  # every head on every rank
        return whole_rows
    if config.selection == "group":
        return whole_rows[shard.kv_start : shard.kv_stop]
    return whole_rows[shard.q_start : shard.q_stop]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""`doublesparse bench offload` at a tiny shape, its full-offload baseline cache, and `doublesparse recall`.

Speed is measured by the commands, not here: these tests check the plumbing and that the baseline
cache decodes exactly what transformers' DynamicCache decodes.
"""

import json

import pytest
import torch
from transformers import DynamicCache

from doublesparse import offload
from doublesparse.cli import main
from doublesparse.eval import bench_decode
from doublesparse.eval.full_offload import FullOffloadCache, make_full_offload_cache
from tiny_models import left_padded_batch, random_channel_mask, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


TINY_RUN = ["bench", "offload", "--config", "tiny", "--context", "96", "--batch", "1,2", "--steps", "2", "--warmup", "1",
            "--threads", "1", "--no-progress"]


def test_bench_offload_writes_json_and_plot(tmp_path):
    assert main([*TINY_RUN, "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_offload.json").read_text())
    assert [(r["batch"], r["method"]) for r in report["rows"]] == [
        (b, m) for b in (1, 2) for m in ("ds_offload", "full_offload", "dense")
    ]
    for row in report["rows"]:
        assert "skipped" not in row and row["tokens_per_s"] > 0 and len(row["step_seconds"]) == 2
        assert row["cache_bytes"]["total"] == row["host_bytes"] + row["device_bytes"]
    by_method = {(r["batch"], r["method"]): r for r in report["rows"]}
    for batch in (1, 2):
        sparse, full, dense = (by_method[(batch, m)] for m in ("ds_offload", "full_offload", "dense"))
        # Both offload methods keep every token's K/V on the host; only the dense cache keeps it on the device.
        assert sparse["host_bytes"] >= full["host_bytes"] > 0 and dense["host_bytes"] == 0
        assert sparse["device_bytes"] < full["device_bytes"]
        assert sparse["speedup_vs_full_offload"] > 0 and sparse["sync_layers"] == [0]
    settings = report["settings"]
    assert settings["sparsity_config"]["offload"] and settings["sparsity_config"]["prefetch"]
    assert settings["sparsity_config"]["token_budget"] == 1 / 16 and settings["sparsity_config"]["label_bits"] == 4
    assert report["device_type"] == "cpu" and "torch" in report["versions"]
    assert (tmp_path / "bench_offload.png").stat().st_size > 0


def test_bench_offload_skips_methods_host_memory_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(offload.host_memory, "available_host_memory", lambda: 4096)
    assert main([*TINY_RUN, "--batch", "1", "--no-plot", "--out-dir", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench_offload.json").read_text())["rows"]}
    assert "host memory" in rows["ds_offload"]["skipped"] and "host memory" in rows["full_offload"]["skipped"]
    assert rows["dense"]["ms_per_step"] > 0


@pytest.mark.parametrize(
    "bad",
    [["--budget", "2"], ["--budget", "a/b"], ["--methods", "ds_offload,flexgen"], ["--methods", "dense,dense"],
     ["--context", "0"], ["--context", "3"], ["--batch", "0"], ["--sync-layers", "5"], ["--channels", "64"], ["--steps", "0"], ["--threads", "0"]],
)
def test_bench_offload_rejects_bad_options_before_building_a_model(tmp_path, monkeypatch, bad):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(bench_decode, "build_model", no_model)
    assert main([*TINY_RUN, *bad, "--out-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "bench_offload.json").exists()


def test_timed_steps_continue_the_filled_cache_at_the_right_positions():
    from doublesparse import HeadLayout
    from doublesparse.eval.bench_offload import fill_cache, time_decode

    model = bench_decode.build_model("tiny", torch.float32, torch.device("cpu"), 0)
    layout = HeadLayout.from_config(model.config)
    cache = make_full_offload_cache(model, max_cache_len=40, batch_size=2)
    positions = []
    model.register_forward_pre_hook(lambda module, args, kwargs: positions.append(kwargs["position_ids"].clone()), with_kwargs=True)
    with torch.no_grad():
        fill_cache(cache, layout, 2, 35, torch.float32, torch.device("cpu"), seed=0)
        seconds = time_decode(model, cache, 2, 35, steps=3, warmup=2, synchronize=lambda: None, seed=0)
    assert len(seconds) == 3 and cache.get_seq_length() == 40
    assert [p.tolist() for p in positions] == [[[35 + step]] * 2 for step in range(5)]


def _generate(model, cache, steps=10):
    input_ids, attention_mask = left_padded_batch([40, 29], seed=2)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, past_key_values=cache,
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
    assert memory["host"] == 2 * num_layers * 49 * 2 * 2 * 16 * 4  # K+V x layers x capacity x batch x KV heads x d x fp32
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
            beams.append(model.generate(input_ids=input_ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0,
                                        past_key_values=cache))
    assert torch.equal(*beams)


def _recall_report(tmp_path, *options):
    out = tmp_path / "recall.json"
    assert main(["recall", "--context-length", "160", "--num-prompts", "2", "--steps", "3", "--out", str(out), "--no-progress",
                 *options]) == 0
    return json.loads(out.read_text())


def test_recall_command_reports_every_predicted_layer(tmp_path):
    from doublesparse.eval.fallback_model import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", num_layers=4, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    random_channel_mask(model, seed=3).save(tmp_path / "mask.safetensors")
    report = _recall_report(tmp_path, "--model", str(tmp_path / "model"), "--channels", str(tmp_path / "mask.safetensors"))
    layers = report["layers"]
    assert [row["layer"] for row in layers] == [0, 1, 2, 3]
    assert not layers[0]["predicted"] and layers[0]["copy"].startswith("sync")
    for row in layers[1:]:
        assert row["predicted"] and row["steps"] == 2 * 3 and 0.0 <= row["mean_recall"] <= 1.0
        assert row["copy"] == ("sync" if row["mean_recall"] < 0.5 else "prefetch")
    assert all(set(prompt["recall"]) == {"1", "2", "3"} for prompt in report["prompts"])
    assert all(0.0 <= value <= 1.0 for prompt in report["prompts"] for value in prompt["recall"].values())
    assert report["settings"]["sparsity_config"]["offload"] and report["settings"]["sparsity_config"]["prefetch"]
    assert report["channels"]["source"].endswith("mask.safetensors") and "versions" in report


def test_recall_command_calibrates_the_tiny_random_model(tmp_path):
    report = _recall_report(tmp_path, "--model", "tiny-random", "--min-recall", "1.0")
    assert report["channels"]["source"] == "calibrated now"
    assert [row["predicted"] for row in report["layers"]] == [False, True]
    assert report["layers"][1]["copy"] == ("prefetch" if report["layers"][1]["mean_recall"] == 1.0 else "sync")


@pytest.mark.parametrize(
    "bad",
    [["--budget", "0"], ["--min-recall", "2"], ["--steps", "0"], ["--context-length", "9000"], ["--channels", "missing.safetensors"],
     ["--num-channels", "64"], ["--model", "no/such/folder"]],
)
def test_recall_command_rejects_bad_options(tmp_path, bad):
    out = tmp_path / "recall.json"
    assert main(["recall", "--model", "tiny-random", "--out", str(out), "--no-progress", *bad]) == 2
    assert not out.exists()

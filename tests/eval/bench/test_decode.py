"""Smoke test of `doublesparse bench decode` at a tiny shape (speed is measured by the command, not here), and
the byte accounting of a decode step that its byte-floor speed-up rests on."""

import json

import pytest

import doublesparse as ds
from doublesparse.cli import main
from doublesparse.eval.bench.common import random_channel_mask
from doublesparse.eval.bench.step_breakdown import STAGES
from doublesparse.eval.bench.step_bytes import step_bytes, weight_bytes
from doublesparse.eval.models import presets
from doublesparse.plan import layer_plans


def test_bench_decode_writes_json_and_plot(tmp_path, capsys):
    code = main(
        [
            "bench",
            "decode",
            "--config",
            "tiny",
            "--context",
            "96",
            "--batch",
            "1,2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
            "--breakdown",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    methods = [(row["dtype"], row["batch"], row["method"]) for row in report["rows"]]
    assert methods == [
        (dtype, batch, method)
        for dtype in ("float32", "bfloat16")
        for batch in (1, 2)
        for method in ("dense", "double_sparsity")
    ]  # a bf16 row beside fp32, by default on CPU
    assert all(row["tokens_per_s"] > 0 and len(row["step_seconds"]) == 2 for row in report["rows"])
    assert all(len(row["step_cpu_seconds"]) == 2 and row["cpu_ms_per_step"] > 0 for row in report["rows"])
    assert report["read_bandwidth_gb_s"] > 0 and report["settings"]["threads"] >= 1
    # Both methods on the same pages: the mode and the weights moved are recorded, and each row's huge-page bytes.
    assert report["huge_pages"]["mode"] in ("always", "madvise", "never", "unavailable")
    assert set(report["huge_pages"]["weight_bytes"]) == {"float32", "bfloat16"}
    assert set(report["row_read_gb_s"]) == {"float32", "bfloat16"}  # the random-row ceiling, per row width
    assert all(rate is None or rate > 0 for rate in report["row_read_gb_s"].values())
    assert all(row["process_huge_page_bytes"] is None or row["process_huge_page_bytes"] >= 0 for row in report["rows"])
    for dense, sparse in zip(report["rows"][0::2], report["rows"][1::2]):
        assert sparse["cache_bytes"]["labels"] > 0 and sparse["speedup_vs_dense"] > 0
        assert dense["step_bytes"]["labels"] == 0 and sparse["step_bytes"]["labels"] > 0
        assert dense["step_bytes"]["weights"] == sparse["step_bytes"]["weights"]
        floor = dense["step_bytes"]["total"] / sparse["step_bytes"]["total"]
        assert sparse["floor_speedup"] == pytest.approx(floor) and floor > 1
        assert sparse["share_of_floor"] == pytest.approx(sparse["speedup_vs_dense"] / floor)
        if report["row_read_gb_s"][sparse["dtype"]] is not None:  # the floor with rows at the random-row rate
            row_floor = sparse["row_floor_speedup"]
            assert sparse["share_of_row_floor"] == pytest.approx(sparse["speedup_vs_dense"] / row_floor)
        assert sparse["cpu_speedup"] == pytest.approx(dense["cpu_ms_per_step"] / sparse["cpu_ms_per_step"])
        for row in (dense, sparse):
            assert row["gb_s"] == pytest.approx(row["step_bytes"]["total"] / (row["ms_per_step"] / 1e3) / 1e9)
            assert set(row["breakdown_ms"]) == set(STAGES) and all(v >= 0 for v in row["breakdown_ms"].values())
            assert row["breakdown_ms"]["attention"] > 0 and row["breakdown_ms"]["mlp"] > 0
    bf16_sparse = [row for row in report["rows"] if row["dtype"] == "bfloat16"][1]
    assert bf16_sparse["cache_bytes"]["keys"] * 2 == report["rows"][1]["cache_bytes"]["keys"]
    assert report["settings"]["sparsity_config"]["token_budget"] == 1 / 16
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "floor" in out and "share" in out and "where a step goes" in out


def test_the_rows_floor_reads_the_selected_rows_at_the_row_rate_and_the_rest_streaming():
    from doublesparse.eval.bench.decode import row_floor_speedup

    dense = {"weights": 100, "kv": 900, "labels": 0, "total": 1000}
    sparse = {"weights": 100, "kv": 60, "labels": 40, "total": 200}
    assert row_floor_speedup(dense, sparse, 10.0, 10.0) == pytest.approx(5.0)  # the byte floor itself
    # K/V rows at half the streaming rate: 140 / 10 + 60 / 5 = 26 time units against 100.
    assert row_floor_speedup(dense, sparse, 10.0, 5.0) == pytest.approx(100 / 26)


def test_bench_decode_rejects_bad_budget_and_dtype(tmp_path):
    assert main(["bench", "decode", "--config", "tiny", "--budget", "2", "--out-dir", str(tmp_path)]) == 2
    assert main(["bench", "decode", "--config", "tiny", "--dtype", "float32,int8", "--out-dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_the_bytes_a_step_must_move_are_counted_from_the_shapes(tied):
    import torch

    model = presets.build_model("tiny", torch.float32, torch.device("cpu"), 0)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    layout = ds.HeadLayout.from_config(model.config)
    config = ds.SparsityConfig(
        num_channels=8, token_budget=1 / 16, label_bits=4, dense_layers=(1,), sink_tokens=0, recent_tokens=0
    )
    plans = layer_plans(random_channel_mask(layout, 0), config, layout)
    hidden, vocab, layers = 128, 512, 2  # the tiny preset: 4 query, 2 KV heads of 32, intermediate 256
    per_layer = 4 * hidden * 32 * 2 + 2 * hidden * 32 * 2 + 3 * hidden * 256 + 2 * hidden  # q, o; k, v; mlp; norms
    params = layers * per_layer + hidden + vocab * hidden  # the final norm; the output projection, read whole
    batch, context = 3, 999
    embedding_rows = 0 if tied else batch * hidden  # an untied embedding is read for the batch's rows only
    assert weight_bytes(model, batch) == 4 * (params + embedding_rows)
    tokens, row = context + 1, 32 * 4
    dense = step_bytes(model, layout, plans, config, "dense", batch, context, 4)
    assert dense["kv"] == layers * 2 * batch * 2 * tokens * row and dense["labels"] == 0
    sparse = step_bytes(model, layout, plans, config, "double_sparsity", batch, context, 4)
    selected = 2 * batch * 2 * config.budget_for(tokens) * row  # K and V rows of the budget, per KV head
    assert sparse["kv"] == selected + 2 * batch * 2 * tokens * row  # layer 1 is dense
    assert sparse["labels"] == batch * 2 * tokens * (8 // 2 + 4)  # 4-bit codes of 8 channels, fp16 scale and offset
    assert sparse["total"] == sparse["weights"] + sparse["kv"] + sparse["labels"]
    with pytest.raises(ValueError, match="method"):
        step_bytes(model, layout, plans, config, "sparse", batch, context, 4)


def test_the_benchmark_shape_has_the_byte_floor_the_issue_names():
    # llama-8l-cpu at 32K, 1/16, r = 16, int4: ~540 MB of weights, 2.1 GB of K/V per dense step, and
    # ~160 MB of labels and selected K/V per Double Sparsity step: floors of ~3.8x (batch 1), ~7.7x (batch 4).
    import torch

    with torch.device("meta"):
        model = presets.build_model("llama-8l-cpu", torch.float32, torch.device("meta"), 0)
    layout = ds.HeadLayout.from_config(model.config)
    config = ds.SparsityConfig(num_channels=16, token_budget=1 / 16, label_bits=4, sink_tokens=0, recent_tokens=0)
    plans = layer_plans(random_channel_mask(layout, 0), config, layout)
    moved = {
        (m, b): step_bytes(model, layout, plans, config, m, b, 32768, 4)
        for m in ("dense", "double_sparsity")
        for b in (1, 4)
    }
    assert moved["dense", 1]["weights"] == pytest.approx(542.5e6, rel=1e-3)
    assert moved["dense", 1]["kv"] == pytest.approx(2.147e9, rel=1e-3)
    assert moved["double_sparsity", 1]["kv"] + moved["double_sparsity", 1]["labels"] == pytest.approx(159.5e6, rel=1e-3)
    floors = [moved["dense", b]["total"] / moved["double_sparsity", b]["total"] for b in (1, 4)]
    assert floors == [pytest.approx(3.83, abs=0.01), pytest.approx(7.74, abs=0.01)]


@pytest.mark.parametrize(
    "options, message",
    [(["--freeze"], "add --compile"), (["--compile", "--breakdown"], "drop --compile")],
)
def test_bench_decode_refuses_options_that_do_not_go_together(tmp_path, capsys, options, message):
    assert main(["bench", "decode", "--config", "tiny", *options, "--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err

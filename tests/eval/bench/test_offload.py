"""`doublesparse bench offload` at a tiny shape: every method timed, skipped when memory cannot hold it, options
checked before any model is built. Speed is measured by the command, not here."""

import json

import pytest
import torch

from doublesparse import offload
from doublesparse.cli import main
from doublesparse.eval.bench.full_offload import make_full_offload_cache
from doublesparse.eval.models import presets

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_RUN = [
    "bench",
    "offload",
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
    "--threads",
    "1",
    "--no-progress",
]


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
    [
        ["--budget", "2"],
        ["--budget", "a/b"],
        ["--methods", "ds_offload,flexgen"],
        ["--methods", "dense,dense"],
        ["--context", "0"],
        ["--context", "3"],
        ["--batch", "0"],
        ["--sync-layers", "5"],
        ["--channels", "64"],
        ["--steps", "0"],
        ["--threads", "0"],
    ],
)
def test_bench_offload_rejects_bad_options_before_building_a_model(tmp_path, monkeypatch, bad):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(presets, "build_model", no_model)
    assert main([*TINY_RUN, *bad, "--out-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "bench_offload.json").exists()


def test_timed_steps_continue_the_filled_cache_at_the_right_positions():
    from doublesparse import HeadLayout
    from doublesparse.eval.bench.offload import fill_cache, time_decode

    model = presets.build_model("tiny", torch.float32, torch.device("cpu"), 0)
    layout = HeadLayout.from_config(model.config)
    cache = make_full_offload_cache(model, max_cache_len=40, batch_size=2)
    positions = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    with torch.no_grad():
        fill_cache(cache, layout, 2, 35, torch.float32, torch.device("cpu"), seed=0)
        seconds = time_decode(model, cache, 2, 35, steps=3, warmup=2, synchronize=lambda: None, seed=0)
    assert len(seconds) == 3 and cache.get_seq_length() == 40
    assert [p.tolist() for p in positions] == [[[35 + step]] * 2 for step in range(5)]

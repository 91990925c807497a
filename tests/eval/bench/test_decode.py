"""Smoke test of `doublesparse bench decode` at a tiny shape (speed is measured by the command, not here)."""

import json

from doublesparse.cli import main


def test_bench_decode_writes_json_and_plot(tmp_path):
    code = main(["bench", "decode", "--config", "tiny", "--context", "96", "--batch", "1,2", "--steps", "2",
                 "--warmup", "1", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    methods = [(row["batch"], row["method"]) for row in report["rows"]]
    assert methods == [(1, "dense"), (1, "double_sparsity"), (2, "dense"), (2, "double_sparsity")]
    assert all(row["tokens_per_s"] > 0 and len(row["step_seconds"]) == 2 for row in report["rows"])
    sparse = [row for row in report["rows"] if row["method"] == "double_sparsity"]
    assert all(row["cache_bytes"]["labels"] > 0 and row["speedup_vs_dense"] > 0 for row in sparse)
    assert report["settings"]["sparsity_config"]["token_budget"] == 1 / 16
    assert (tmp_path / "bench_decode.png").stat().st_size > 0


def test_bench_decode_rejects_bad_budget(tmp_path):
    assert main(["bench", "decode", "--config", "tiny", "--budget", "2", "--out-dir", str(tmp_path)]) == 2

"""Smoke test of `doublesparse bench kernels` at a tiny shape (seconds)."""

import json

import pytest

from doublesparse.cli import main
from doublesparse.eval.bench.common import parse_contexts
from doublesparse.eval.bench.kernels import bytes_moved
from doublesparse.eval.harness.budgets import parse_budgets

TINY = [
    "--contexts",
    "200,1K",
    "--budgets",
    "1/4,1/32",
    "--label-bits",
    "16,4",
    "--query-heads",
    "4",
    "--kv-heads",
    "2",
    "--head-dim",
    "64",
    "--channels",
    "8",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--no-progress",
    "--device",
    "cpu",
]


def test_bench_kernels_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "kernels", *TINY, "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert (tmp_path / "bench_kernels.png").stat().st_size > 0
    assert report["settings"]["contexts"] == [200, 1024] and report["versions"]["torch"]
    methods = [(row["context"], row["method"], row["budget"], row["label_bits"]) for row in report["results"]]
    assert len(methods) == 2 * (2 + 4) and (1024, "double_sparsity", "1/32", 4) in methods
    assert all(row["median_ms"] > 0 and row["bytes"] > 0 for row in report["results"])
    assert "double_sparsity" in capsys.readouterr().out


def test_bench_kernels_runs_the_triton_kernels(tmp_path):
    args = [
        "bench",
        "kernels",
        *TINY,
        "--contexts",
        "100",
        "--budgets",
        "1/4",
        "--label-bits",
        "8",
        "--repeats",
        "1",
        "--backend",
        "triton",
        "--no-plot",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "bench_kernels.json").read_text())["settings"]["backend"] == "triton"


def test_bench_kernels_rejects_bad_options(capsys):
    assert main(["bench", "kernels", "--budgets", "3/2", "--no-progress"]) == 2
    assert "--budgets" in capsys.readouterr().err
    with pytest.raises(ValueError, match="4K"):
        parse_contexts("4Q")
    assert parse_budgets("1/16, 0.25") == [pytest.approx(1 / 16), pytest.approx(0.25)]


def test_sparse_step_moves_fewer_bytes_than_dense():
    common = dict(batch=1, q_heads=32, kv_heads=8, select_heads=8, head_dim=128, tokens=32768, elt=2)
    dense = bytes_moved("dense", slots=32768, label_bytes=0, **common)
    sparse = bytes_moved("step", slots=2048, label_bytes=8 * 32768 * 12, **common)
    assert 4 < dense / sparse < 16

"""`doublesparse run` on the tiny stand-in: it calibrates, evaluates and writes every result file."""

import json

import pytest

from doublesparse.cli import main


@pytest.mark.usefixtures("one_thread")
def test_main_job_writes_every_result_file(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--tiny",
                "--methods",
                "dense,double_sparsity",
                "--sparsity",
                "1/4",
                "--num-samples",
                "1",
                "--out-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "RANDOM weights" in capsys.readouterr().out
    for name in ("results.json", "results.csv", "results.png", "results.md", "channels.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["channels"]["source"] == "calibrated now" and document["model"]["trained"] is False
    runs = {(r["task"], r["method"], r["sparsity_label"]) for r in document["results"]}
    assert runs == {
        (task, method, label)
        for task in ("perplexity", "kv_retrieval")
        for method, label in (("dense", "dense"), ("double_sparsity", "1/4"))
    }
    assert document["tasks"]["kv_retrieval"]["settings"]["num_samples"] == 1


def test_main_job_rejects_a_bad_sparsity(tmp_path, capsys):
    assert main(["run", "--tiny", "--sparsity", "1/4,2", "--out-dir", str(tmp_path)]) == 2
    assert "--sparsity" in capsys.readouterr().err and not (tmp_path / "results.json").exists()

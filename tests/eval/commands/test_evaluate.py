"""`doublesparse eval`: bad input fails before any model loads; a small run writes JSON, CSV and a plot that carry
the settings."""

from __future__ import annotations

import argparse
import csv
import json
import re

import pytest
import torch

from doublesparse.cli import main as cli_main
from doublesparse.eval.commands import evaluate as command
from doublesparse.eval.harness.runner import execute_plan
from doublesparse.eval.models import source as model_source

from tiny_models import random_channel_mask, tiny_model


def eval_args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-random", "--channels", "calibrate"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(model_source.ModelSource, "load", refuse)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "dense,h3o"}, "unknown method 'h3o'"),
        ({"task": "perplexity,haystack"}, "unknown task 'haystack'"),
        ({"sparsity": "1/4,0"}, "must lie in \\(0, 1\\]"),
        ({"sparsity": "1.5"}, "must lie in \\(0, 1\\]"),
        ({"sparsity": "1/0"}, "not a number"),
        ({"sparsity": "a quarter"}, "not a number"),
        ({"num_channels": 64}, "r must be <= head_dim"),
        ({"num_samples": 0}, "--num-samples"),
        ({"model": "/no/such/model"}, "is not a folder or a .gguf file"),
        ({"channels": "/no/such/mask.safetensors", "method": "double_sparsity"}, "does not exist"),
        ({"text": "/no/such/text.txt"}, "is not a file"),
        ({"task": "lm_eval:", "method": "dense"}, "unknown task 'lm_eval:'"),
    ],
)
def test_bad_input_fails_before_loading(no_model_loading, overrides, message):
    with pytest.raises(ValueError, match=message):
        command.plan_from_args(eval_args(**overrides))


def test_channel_mask_of_another_model_is_refused(no_model_loading, tmp_path):
    model_dir = tmp_path / "model"
    other = tiny_model("llama", num_layers=3)  # three layers; the mask below is for two
    other.config.save_pretrained(model_dir)
    mask_path = tmp_path / "mask.safetensors"
    random_channel_mask(tiny_model("llama", num_layers=2)).save(mask_path)
    with pytest.raises(ValueError, match="channel mask has 2 layers but the model has 3"):
        command.plan_from_args(eval_args(model=str(model_dir), channels=str(mask_path), method="dense,double_sparsity"))


def test_cli_reports_bad_input_as_an_error(no_model_loading, capsys):
    assert cli_main(["eval", "--model", "tiny-random", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_small_run_writes_reproducible_results(tmp_path):
    out = tmp_path / "results.json"
    args = eval_args(
        method="dense,double_sparsity,h2o",
        task="perplexity,kv_retrieval",
        sparsity="1/4,1/2",
        num_samples=2,
        context_length=128,
        window=64,
        num_windows=2,
        out=str(out),
        csv="",
        plot=str(tmp_path / "plot.png"),
        no_progress=True,
        num_channels=8,
    )
    plan = command.plan_from_args(args)
    document = execute_plan(plan, progress=False, command=["doublesparse", "eval", "..."])
    saved = json.loads(out.read_text())
    assert saved["seed"] == 0 and saved["model"]["trained"] is False
    assert {"torch", "transformers", "doublesparse"} <= set(saved["environment"]["versions"])
    commit = saved["environment"]["commit"]  # the figures name the code that measured them
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit
    assert saved["tasks"]["kv_retrieval"]["settings"]["num_samples"] == 2
    runs = {(r["task"], r["method"], r["sparsity_label"]) for r in saved["results"]}
    assert ("perplexity", "dense", "dense") in runs and ("kv_retrieval", "h2o", "1/4") in runs and len(runs) == 10
    sparse_row = next(r for r in saved["results"] if r["method"] == "double_sparsity")
    # Perplexity comes first; its default protocol decodes after a dense prompt (no simulate).
    assert sparse_row["config"]["num_channels"] == 8 and sparse_row["config"]["simulate"] is False
    assert sparse_row["protocol"] == "continuation" and saved["tasks"]["perplexity"]["protocol"] == "continuation"
    journal = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    samples = [r for r in journal if r["record"] == "sample"]
    assert len(samples) == 2 * 5 + 2 * 5  # 2 windows and 2 prompts, each under 5 (method, sparsity) runs
    with open(tmp_path / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 10
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "double_sparsity" in document["table"]
    assert torch.isfinite(torch.tensor([r["value"] for r in saved["results"]])).all()


def test_method_variants_run_beside_their_method_with_configs_of_their_own(tmp_path):
    out = tmp_path / "results.json"
    args = eval_args(
        method="double_sparsity,double_sparsity+num_channels=4+label_bits=8",
        task="perplexity",
        sparsity="1/4",
        window=64,
        num_windows=2,
        out=str(out),
        no_progress=True,
        num_channels=8,
        # Nothing forced in: at 1/4 of 64 tokens the default sink and recent tokens would fill the budget.
        sink_tokens=0,
        recent_tokens=0,
    )
    execute_plan(command.plan_from_args(args), progress=False, command=["doublesparse", "eval", "..."])
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    base, variant = rows["double_sparsity"], rows["double_sparsity+num_channels=4+label_bits=8"]
    assert base["config"]["num_channels"] == 8 and base["config"]["label_bits"] == 4
    assert variant["config"]["num_channels"] == 4 and variant["config"]["label_bits"] == 8
    assert variant["value"] != base["value"]


@pytest.mark.parametrize(
    "method, message",
    [
        ("double_sparsity+num_channel=4", "not a SparsityConfig field"),
        ("double_sparsity+token_budget=0.5", "not a SparsityConfig field a method may set"),
        ("double_sparsity+num_channels", "is not FIELD=VALUE"),
        ("double_sparsity+label_bits=3", "label_bits"),
        ("double_sparsity+num_channels=64", "r must be <= head_dim"),
        ("h3o+num_channels=4", "unknown method 'h3o"),
    ],
)
def test_bad_method_variants_fail_before_loading(no_model_loading, method, message):
    with pytest.raises(ValueError, match=message):
        command.plan_from_args(eval_args(method=method))


def test_projection_labels_need_a_mask_that_holds_them(no_model_loading, tmp_path):
    model_dir = tmp_path / "model"
    model = tiny_model("llama", num_layers=2)
    model.config.save_pretrained(model_dir)
    mask_path = tmp_path / "mask.safetensors"
    random_channel_mask(model).save(mask_path)
    with pytest.raises(ValueError, match="does not hold"):
        command.plan_from_args(
            eval_args(model=str(model_dir), channels=str(mask_path), method="double_sparsity+labels=projection")
        )

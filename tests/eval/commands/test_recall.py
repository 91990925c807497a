"""`doublesparse recall`: per-layer recall of the offload prefetch, on a saved model and on the tiny stand-in."""

import json

import pytest

from doublesparse.cli import main

from tiny_models import random_channel_mask, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _recall_report(tmp_path, *options):
    out = tmp_path / "recall.json"
    assert (
        main(
            [
                "recall",
                "--context-length",
                "160",
                "--num-prompts",
                "2",
                "--steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
                *options,
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def test_recall_command_reports_every_predicted_layer(tmp_path):
    from doublesparse.eval.models.tiny_random import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", num_layers=4, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    random_channel_mask(model, seed=3).save(tmp_path / "mask.safetensors")
    report = _recall_report(
        tmp_path, "--model", str(tmp_path / "model"), "--channels", str(tmp_path / "mask.safetensors")
    )
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
    [
        ["--budget", "0"],
        ["--min-recall", "2"],
        ["--steps", "0"],
        ["--context-length", "9000"],
        ["--channels", "missing.safetensors"],
        ["--num-channels", "64"],
        ["--model", "no/such/folder"],
    ],
)
def test_recall_command_rejects_bad_options(tmp_path, bad):
    out = tmp_path / "recall.json"
    assert main(["recall", "--model", "tiny-random", "--out", str(out), "--no-progress", *bad]) == 2
    assert not out.exists()

"""A few steps of scripts/train_default_model.py on a tiny config leave a loadable checkpoint and a report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"
TINY_ARGS = [
    "--steps",
    "4",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--intermediate-size",
    "64",
    "--num-heads",
    "2",
    "--num-kv-heads",
    "1",
    "--head-dim",
    "16",
    "--vocab-size",
    "384",
    "--context-lengths",
    "160,256",
    "--stage-fractions",
    "0.5,0.5",
    "--batch-tokens",
    "512",
    "--warmup-steps",
    "2",
    "--eval-every",
    "2",
    "--eval-samples",
    "2",
    "--eval-text-tokens",
    "256",
    "--final-eval-samples",
    "2",
    "--final-eval-text-tokens",
    "256",
    "--tokenizer-chars",
    "60000",
    "--max-train-chars",
    "60000",
    "--device",
    "cpu",
]


def load_script():
    """The training script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_training_run_writes_a_loadable_model(tmp_path: Path) -> None:
    out_dir = tmp_path / "model"
    load_script().main(["--out-dir", str(out_dir), *TINY_ARGS])
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "calibration.txt",
        "heldout.txt",
        "MODEL_CARD.md",
        "metrics.json",
        "loss_curve.json",
        "loss_curve.png",
    ):
        assert (out_dir / name).is_file(), name
    curve = json.loads((out_dir / "loss_curve.json").read_text())
    assert [entry["step"] for entry in curve["train"]] == [0, 1, 2, 3]
    assert [entry["context_length"] for entry in curve["train"]] == [160, 160, 256, 256]
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert model.config.num_key_value_heads == 1 and len(tokenizer) == 384
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["heldout_perplexity"] > 1.0
    card = (out_dir / "MODEL_CARD.md").read_text()
    assert "Reproduce" in card and "## Targets" in card
    # Four steps retrieve nothing: the card must say so, not hide it.
    assert "Not reached by this run" in card
    # --card-only rebuilds the same card from the recorded summary and metrics alone.
    (out_dir / "MODEL_CARD.md").unlink()
    load_script().main(["--out-dir", str(out_dir), "--card-only"])
    assert (out_dir / "MODEL_CARD.md").read_text() == card


def test_stdlib_split_is_deterministic_and_disjoint() -> None:
    script = load_script()
    _, files = script.stdlib_sources()
    splits = {name: script.split_of(name) for name in files}
    assert splits == {name: script.split_of(name) for name in files}
    counts = {
        split: sum(1 for value in splits.values() if value == split) for split in ("train", "calibration", "heldout")
    }
    assert counts["train"] > 10 * counts["heldout"] > 0 and counts["calibration"] > 0

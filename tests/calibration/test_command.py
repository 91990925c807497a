"""Calibration data sources and the `calibrate` / `inspect` commands, end to end on a saved tiny model."""

import argparse
import json

import pytest
import torch

from doublesparse.calibration import command, inspect_command
from doublesparse.calibration.data import (
    calibration_blocks,
    default_data_path,
    pack_blocks,
    read_documents,
    sample_blocks,
)
from doublesparse.channels import ChannelMask

from tiny_models import tiny_model
from tiny_tokenizer import sample_texts, tiny_tokenizer


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model("qwen2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(sample_texts(10)), encoding="utf-8")
    return path


def test_text_folder_and_jsonl_sources(tmp_path):
    texts = sample_texts(3)
    (tmp_path / "docs").mkdir()
    for index, text in enumerate(texts):
        (tmp_path / "docs" / f"{index}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "docs" / "notes.md").write_text("not read", encoding="utf-8")
    assert read_documents(tmp_path / "docs") == texts
    assert read_documents(tmp_path / "docs" / "1.txt") == [texts[1]]

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n", encoding="utf-8"
    )
    assert read_documents(jsonl, field="body") == texts
    with pytest.raises(ValueError, match="--field"):
        read_documents(jsonl)


def test_saved_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = sample_texts(3)
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "saved"))
    assert read_documents(tmp_path / "saved", field="content") == texts
    with pytest.raises(ValueError, match="--field"):
        read_documents(tmp_path / "saved")


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        read_documents(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text(" \n\n ", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        read_documents(tmp_path / "blank.txt")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        read_documents(tmp_path / "broken.jsonl")


def test_packing_and_seeded_sampling():
    tokenizer = tiny_tokenizer()
    texts = sample_texts(8)
    blocks = pack_blocks(tokenizer, texts, 32, seed=0)
    assert blocks.shape[1] == 32 and (blocks[:, 0] == tokenizer.bos_token_id).all()
    # Every token of every document is in the stream, documents joined by EOS.
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) + len(texts) - 1
    assert len(blocks) == total // 31
    assert int((blocks == tokenizer.eos_token_id).sum()) <= len(texts) - 1
    first = calibration_blocks(tokenizer, texts, num_samples=5, seq_len=32, seed=3)
    assert torch.equal(first, calibration_blocks(tokenizer, texts, num_samples=5, seq_len=32, seed=3))
    assert not torch.equal(first, calibration_blocks(tokenizer, texts, num_samples=5, seq_len=32, seed=4))
    assert len(sample_blocks(blocks, 10_000, seed=0)) == len(blocks)


def test_long_document_tokenized_in_pieces_like_whole(monkeypatch):
    import doublesparse.calibration.data as data

    tokenizer = tiny_tokenizer()
    text = "\n".join(sample_texts(20))
    whole = pack_blocks(tokenizer, [text], 16)
    monkeypatch.setattr(data, "PIECE_CHARS", 100)
    assert torch.equal(pack_blocks(tokenizer, [text], 16), whole)


def test_calibrate_command_writes_mask_json_and_summary(saved_model, corpus, tmp_path, capsys):
    out = tmp_path / "out" / "channels.safetensors"
    argv = [
        "--model",
        str(saved_model),
        "--data",
        str(corpus),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "3",
    ]
    argv += ["--device", "cpu", "--out", str(out), "--format", "json", "--no-progress", "--keep-rope-pairs"]
    assert command.run(parse(command, argv)) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "r=8" in printed and "128 tokens" in printed
    mask = ChannelMask.load(out)
    assert mask.calibration["source"] == str(corpus) and mask.calibration["num_samples"] == 4
    assert mask.calibration["keep_rope_pairs"] is True
    from_json = ChannelMask.load(out.with_suffix(".json"), layout=mask.layout)
    assert torch.equal(from_json.ranking, mask.ranking)


def test_inspect_command_tables_and_plot(saved_model, corpus, tmp_path, capsys):
    out = tmp_path / "channels.safetensors"
    argv = ["--model", str(saved_model), "--data", str(corpus), "--samples", "2", "--seq-len", "32"]
    command.run(parse(command, argv + ["--device", "cpu", "--out", str(out), "--format", "json", "--no-progress"]))
    capsys.readouterr()

    plot = tmp_path / "plots" / "importance.png"
    assert inspect_command.run(parse(inspect_command, [str(out), "--r", "4", "--plot", str(plot)])) == 0
    printed = capsys.readouterr().out
    assert "h3" in printed and "mean" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    layer_plot = tmp_path / "layer1.png"
    assert (
        inspect_command.run(
            parse(inspect_command, [str(out), "--per-kv", "--kind", "k", "--layer", "1", "--plot", str(layer_plot)])
        )
        == 0
    )
    assert layer_plot.is_file()

    assert inspect_command.run(parse(inspect_command, [str(out.with_suffix(".json")), "--r", "4"])) == 0
    assert "top 4 channels" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--r"):
        inspect_command.run(parse(inspect_command, [str(out), "--r", "99"]))


def test_calibrate_command_checks_before_loading(saved_model, corpus, tmp_path):
    base = ["--model", str(saved_model), "--no-progress"]
    with pytest.raises(ValueError, match="--format json"):
        command.run(parse(command, base + ["--data", str(corpus), "--out", str(tmp_path / "x.json")]))
    with pytest.raises(ValueError, match="samples"):
        command.run(parse(command, base + ["--data", str(corpus), "--samples", "0"]))
    with pytest.raises(ValueError, match="does not exist"):
        command.run(parse(command, base + ["--data", str(tmp_path / "nope.txt")]))
    with pytest.raises(ValueError, match="fewer than one block"):
        command.run(
            parse(
                command, base + ["--data", str(corpus), "--seq-len", "100000", "--out", str(tmp_path / "c.safetensors")]
            )
        )
    assert not (tmp_path / "c.safetensors").exists()
    if default_data_path() is None:
        with pytest.raises(ValueError, match="--data"):
            command.run(parse(command, base))


def test_json_export_warns_that_sglang_classic_cannot_serve_gqa(saved_model, corpus, tmp_path, capsys, caplog):
    out = tmp_path / "channels.safetensors"
    argv = ["--model", str(saved_model), "--data", str(corpus), "--samples", "2", "--seq-len", "32"]
    command.run(parse(command, argv + ["--device", "cpu", "--out", str(out), "--format", "json", "--no-progress"]))
    captured = capsys.readouterr()
    assert "warning: SGLang's classic Double Sparsity backend cannot serve this GQA model" in captured.err
    assert "4 query heads, 2 KV heads" in captured.err
    with caplog.at_level("WARNING", logger="doublesparse.channels"):  # the API warns too
        ChannelMask.load(out).to_authors_json(tmp_path / "again.json")
    assert any("cannot serve this GQA model" in record.message for record in caplog.records)
    assert f"content sha256 {ChannelMask.load(out).source_hash}" in captured.out
    # inspect names the hash and how it was obtained.
    inspect_command.run(parse(inspect_command, [str(out), "--r", "4", "--per-kv"]))
    assert f"content sha256 {ChannelMask.load(out).source_hash} (verified" in capsys.readouterr().out


def test_device_map_auto_loads_through_accelerate_or_names_it(saved_model, monkeypatch):
    pytest.importorskip("accelerate")
    model, _, _ = command.load_model(str(saved_model), "float32", "auto", None)
    assert next(model.parameters()).device.type == "cpu"
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="pip install accelerate"):
        command.load_model(str(saved_model), "float32", "auto", None)

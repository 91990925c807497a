"""Every family of the matrix through the commands: `doublesparse calibrate --model <folder>` on a saved tiny
model, then `doublesparse eval` on it with the mask it wrote (tiny settings: a fraction of a second each)."""

import json

import pytest

from doublesparse.channels import ChannelMask
from doublesparse.cli import main as cli_main
from doublesparse.layout import HeadLayout

from tiny_models import MATRIX, tiny_model
from tiny_tokenizer import sample_texts, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", MATRIX)
def test_calibrate_and_eval_commands_on_a_saved_tiny_model(arch, tmp_path):
    folder = tmp_path / "model"
    model = tiny_model(arch)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(sample_texts(6)), encoding="utf-8")
    mask_path = tmp_path / "channels.safetensors"
    assert cli_main([
        "calibrate", "--model", str(folder), "--data", str(corpus), "--samples", "4", "--seq-len", "24",
        "--batch-size", "2", "--device", "cpu", "--out", str(mask_path), "--no-progress",
    ]) == 0  # fmt: skip
    mask = ChannelMask.load(mask_path)
    layout = HeadLayout.from_config(model.config)
    assert mask.ranking.shape == (layout.num_layers, layout.num_heads, layout.head_dim)
    assert mask.layout.value_dim == layout.value_dim
    out = tmp_path / "results.json"
    assert cli_main([
        "eval", "--model", str(folder), "--channels", str(mask_path), "--task", "perplexity",
        "--method", "dense,double_sparsity,oracle_topk", "--sparsity", "1/4,1", "--window", "32", "--num-windows", "1",
        "--num-channels", "4", "--out", str(out), "--no-progress",
    ]) == 0  # fmt: skip
    results = {(row["method"], row["sparsity_label"]): row["value"] for row in json.loads(out.read_text())["results"]}
    assert set(results) == {
        ("dense", "dense"),
        *((m, s) for m in ("double_sparsity", "oracle_topk") for s in ("1/4", "1")),
    }
    # A budget of the whole context is the dense model; a quarter of it is not.
    dense = results[("dense", "dense")]
    for method in ("double_sparsity", "oracle_topk"):
        assert results[(method, "1")] == pytest.approx(dense, rel=1e-5)
        assert results[(method, "1/4")] != pytest.approx(dense, rel=1e-5)

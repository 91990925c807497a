"""The shared dense prefix: on the bundled model, every method's figures with the prefix prefilled once equal those
of each method prefilling by itself; and rows after a prefix (the continuation protocol, retrieval answers) equal
token-by-token decoding, row by row."""

from __future__ import annotations

import pytest
import torch

from doublesparse import SparsityConfig
from doublesparse.eval.harness.plan import GridSpec
from doublesparse.eval.harness.runner import evaluate_grid
from doublesparse.eval.methods import make_method
from doublesparse.eval.methods.names import METHOD_NAMES
from doublesparse.eval.methods.prefix import dense_prefix
from doublesparse.eval.models.source import bundled_model_present
from doublesparse.eval.tasks import make_task

pytestmark = pytest.mark.skipif(
    not bundled_model_present(),
    reason="the bundled trained model is not installed (doublesparse/assets/default_model has no weights)",
)


@pytest.fixture(scope="module")
def bundled():
    from doublesparse import load_default_model
    from doublesparse.channels import ChannelMask
    from doublesparse.eval.models.channel_masks import shipped_mask_path

    model, tokenizer = load_default_model()
    return model, tokenizer, ChannelMask.load(shipped_mask_path())


def _methods():
    return [make_method(name) for name in METHOD_NAMES]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_prefix_reuse_equals_separate_prefills_for_every_method(bundled):
    model, tokenizer, mask = bundled
    tasks = [
        make_task("kv_retrieval", num_samples=3, context_length=512),
        make_task("perplexity", window=384, num_windows=2, continuation=48),
    ]
    base = SparsityConfig(num_channels=16, token_budget=1.0, sink_tokens=2, recent_tokens=4, label_bits=16)
    spec = GridSpec(tasks=tasks, methods=_methods(), sparsities=[1 / 8], base_config=base, seed=5)
    rows = evaluate_grid(model, tokenizer, mask, spec, progress=False)
    assert len(rows) == 2 * (1 + 7)
    for row in rows:
        task = next(t for t in tasks if t.name == row["task"])
        method = make_method(row["method"])
        config = base.replace(token_budget=1.0 if row["sparsity"] is None else row["sparsity"])
        with method.patch(model, config, mask):
            separate = task.evaluate(model, tokenizer)  # each prompt prefilled under the method itself
        for name, value in separate.items():
            assert row["figures"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (row["task"], row["method"], name)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "dense"])
def test_rows_after_a_prefix_equal_token_by_token_decoding(bundled, name):
    model, tokenizer, mask = bundled
    text = make_task("perplexity", window=300, num_windows=1, continuation=40)
    text.prepare(tokenizer, seed=0)
    prefix = dense_prefix(model, text.prefix_ids(0), attention_received=True)
    rows = text.windows[:, prefix.length : prefix.length + 40]
    method = make_method(name)
    config = SparsityConfig(num_channels=16, token_budget=1 / 8, sink_tokens=1, recent_tokens=3, label_bits=16)
    with torch.no_grad(), method.patch(model, config, mask):
        together = model(input_ids=rows, past_key_values=method.prefix_cache(model, prefix)).logits[0]
        cache = method.prefix_cache(model, prefix)
        one_by_one = torch.cat(
            [model(input_ids=rows[:, i : i + 1], past_key_values=cache).logits[0] for i in range(rows.shape[1])]
        )
    assert (together - one_by_one).abs().max() < 1e-4
    # Sparse at all: the rows differ from dense attention.
    with torch.no_grad():
        dense = model(input_ids=rows, past_key_values=make_method("dense").prefix_cache(model, prefix)).logits[0]
    assert (together - dense).abs().max() > 1e-3

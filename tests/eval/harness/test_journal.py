"""The results journal: every sample is written as it is measured, an interrupted grid keeps them, and --resume
skips them (a grid grown to more samples measures only the new ones)."""

from __future__ import annotations

import json

import pytest

from doublesparse import SparsityConfig
from doublesparse.eval.harness.journal import Journal, read_samples
from doublesparse.eval.harness.plan import GridSpec
from doublesparse.eval.harness.runner import evaluate_grid
from doublesparse.eval.methods import make_method
from doublesparse.eval.models.tiny_random import tiny_model_and_tokenizer
from doublesparse.eval.tasks import make_task

from tiny_models import random_channel_mask


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    return model, tokenizer, random_channel_mask(model)


def _spec(samples: int) -> GridSpec:
    tasks = [
        make_task("passkey", num_samples=samples, context_length=96),
        make_task("perplexity", window=64, num_windows=samples, continuation=16),
    ]
    methods = [make_method(name) for name in ("dense", "double_sparsity", "h2o")]
    return GridSpec(
        tasks=tasks,
        methods=methods,
        sparsities=[1 / 4],
        base_config=SparsityConfig(token_budget=1.0, label_bits=16, sink_tokens=0, recent_tokens=0),
    )


@pytest.mark.slow
def test_an_interrupted_grid_keeps_its_samples_and_resumes_from_them(tiny, tmp_path, monkeypatch):
    model, tokenizer, mask = tiny
    path = tmp_path / "results.jsonl"
    spec = _spec(2)
    calls = []
    original = type(spec.tasks[1]).evaluate_sample

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # the fifth perplexity sample never finishes
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(spec.tasks[1]), "evaluate_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_grid(model, tokenizer, mask, spec, progress=False, journal=Journal(path))
    kept = read_samples(path)
    assert len(kept) == 2 * 3 + 4  # every passkey sample, and the perplexity samples measured before the stop
    monkeypatch.setattr(type(spec.tasks[1]), "evaluate_sample", original)
    measured = []
    counting = lambda self, *a, **k: measured.append(1) or original(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(type(spec.tasks[1]), "evaluate_sample", counting)
    resumed = evaluate_grid(model, tokenizer, mask, _spec(2), progress=False, journal=Journal(path, resume=True))
    assert len(measured) == 2  # only what the interruption lost
    fresh = evaluate_grid(model, tokenizer, mask, _spec(2), progress=False)
    assert [r["value"] for r in resumed] == pytest.approx([r["value"] for r in fresh], rel=1e-6)


@pytest.mark.slow
def test_a_grown_grid_measures_only_its_new_samples(tiny, tmp_path):
    model, tokenizer, mask = tiny
    path = tmp_path / "results.jsonl"
    evaluate_grid(model, tokenizer, mask, _spec(1), progress=False, journal=Journal(path))
    before = len(read_samples(path))
    rows = evaluate_grid(model, tokenizer, mask, _spec(2), progress=False, journal=Journal(path, resume=True))
    assert len(read_samples(path)) == 2 * before and all(r["samples"] == 2 for r in rows)
    # Without --resume the journal starts over.
    evaluate_grid(model, tokenizer, mask, _spec(1), progress=False, journal=Journal(path))
    assert len(read_samples(path)) == before


def test_a_torn_last_line_is_skipped_and_a_damaged_journal_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    journal = Journal(path)
    journal.add_sample("key", 0, {"task": "t", "figures": {}, "seconds": 0.0})
    with path.open("a") as handle:
        handle.write('{"record": "sample", "run_key": "key", "sam')
    assert list(read_samples(path)) == [("key", 0)]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="damaged"):
        read_samples(path)
    path.write_text(json.dumps({"record": "grid", "format": "something else"}) + "\n")
    with pytest.raises(ValueError, match="not a doublesparse results journal"):
        read_samples(path)

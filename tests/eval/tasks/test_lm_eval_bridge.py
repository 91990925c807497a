"""The lm-eval bridge runs the shipped offline tasks (multiple choice, loglikelihood) on a patched tiny model."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from doublesparse import SparsityConfig
from doublesparse.eval import methods
from doublesparse.eval.models.tiny_random import tiny_model_and_tokenizer
from doublesparse.eval.tasks import make_task
from doublesparse.eval.tasks.lm_eval_bridge import lm_eval_model_class, shipped_task_names


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model_and_tokenizer(seed=0)


def test_shipped_tasks_are_there():
    assert {"ds_python_mc", "ds_kv_loglikelihood"} <= set(shipped_task_names())


@pytest.mark.parametrize(
    "task_name, metrics", [("lm_eval:ds_python_mc", {"acc"}), ("lm_eval:ds_kv_loglikelihood", {"acc", "perplexity"})]
)
def test_local_task_runs_offline_on_a_patched_model(model_and_tokenizer, task_name, metrics):
    model, tokenizer = model_and_tokenizer
    task = make_task(task_name, num_samples=3)
    task.prepare(tokenizer, seed=0)
    method = methods.make_method("oracle_topk")
    with method.patch(
        model, SparsityConfig(token_budget=0.25, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0)
    ):
        figures = task.evaluate(model, tokenizer)
    assert metrics <= set(figures) and 0.0 <= figures["acc"] <= 1.0


def test_loglikelihood_matches_a_direct_forward(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    lm = lm_eval_model_class()(pretrained=model, tokenizer=tokenizer)
    context = tokenizer("line apple-berry: REGISTER_CONTENT is <")["input_ids"]
    continuation = tokenizer("12345", add_special_tokens=False)["input_ids"]
    ((logprob, greedy),) = lm._loglikelihood_tokens([(None, context, continuation)])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
    expected = sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert isinstance(greedy, bool)

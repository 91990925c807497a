"""The lm-eval bridge: any lm-eval task, by name, on a model patched with any method.

`DoubleSparseLM` is an lm-eval model (a `TemplateLM`, like lm-eval's HFLM) built around a model object
that is already loaded (and patched by the harness), registered with lm-eval as model type "doublesparse".
The tasks shipped in `lm_eval_tasks/` read local jsonl files, so they run with no network; lm-eval's own tasks work
wherever their datasets can be loaded. lm-eval is imported only here, when such a task runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .base import Task

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LM_EVAL_MODEL_NAME = "doublesparse"


def local_tasks_dir() -> Path:
    """Folder of the task YAMLs shipped with doublesparse (added to lm-eval's task search path)."""
    return LOCAL_TASKS_DIR


def lm_eval_model_class() -> type:
    """The `DoubleSparseLM` class, registered with lm-eval as model type "doublesparse" (idempotent).

    It subclasses lm-eval's `TemplateLM` rather than `HFLM`: HFLM needs `accelerate` only to load
    models by name, and here the model object is always given.
    """
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    try:
        return get_model(LM_EVAL_MODEL_NAME)
    except (ValueError, KeyError):
        pass

    class DoubleSparseLM(TemplateLM):
        """lm-eval model over an already loaded (and patched) causal LM and its tokenizer; one request per pass."""

        def __init__(self, pretrained: Any, tokenizer: Any, max_length: Optional[int] = None, **_: Any) -> None:
            super().__init__()
            if isinstance(pretrained, str):
                raise ValueError("DoubleSparseLM wraps a loaded model object; load the model (and patch it) first")
            self.model, self.tokenizer = pretrained, tokenizer
            self.model_device = next(pretrained.parameters()).device
            self.max_length = max_length or int(getattr(pretrained.config, "max_position_embeddings", 2048))

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def _logprobs(self, tokens: list[int]) -> torch.Tensor:
            ids = torch.tensor([tokens[-self.max_length :]], device=self.model_device)
            with torch.no_grad():
                return torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            logprobs = self._logprobs(context + continuation)[-len(continuation) - 1 : -1]
            target = torch.tensor(continuation, device=logprobs.device)
            picked = logprobs.gather(1, target[:, None]).sum()
            return float(picked), bool((logprobs.argmax(dim=-1) == target).all())

        def _loglikelihood_tokens(
            self, requests, disable_tqdm: bool = False, **kwargs: Any
        ) -> list[tuple[float, bool]]:
            results = []
            for request, context, continuation in requests:
                result = self._score(context, continuation)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, result)
                results.append(result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in [request.args for request in requests]:
                windows = get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                )
                totals.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            outputs = []
            for context, gen_kwargs in [request.args for request in requests]:
                until = gen_kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                ids = torch.tensor([self.tok_encode(context)[-self.max_length :]], device=self.model_device)
                with torch.no_grad():
                    generated = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=int(gen_kwargs.get("max_gen_toks", 64)),
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                text = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    register_model(LM_EVAL_MODEL_NAME)(DoubleSparseLM)
    return DoubleSparseLM


class LmEvalTask(Task):
    """One lm-eval task run through `lm_eval.simple_evaluate` on the patched model."""

    teacher_forced = True  # loglikelihood requests are teacher-forced passes
    protocol = "lm-eval"

    def __init__(
        self, lm_eval_task: str, num_samples: Optional[int] = None, batch_size: int = 4, metric: Optional[str] = None
    ) -> None:
        if not lm_eval_task:
            raise ValueError("name the lm-eval task: lm_eval:<task>")
        self.lm_eval_task, self.limit, self.batch_size = lm_eval_task, num_samples, batch_size
        self.name = f"lm_eval:{lm_eval_task}"
        self.metric = metric or "acc"
        self.seed = 0
        self.task_manager = None

    def settings(self) -> dict[str, Any]:
        return {"lm_eval_task": self.lm_eval_task, "limit": self.limit, "metric": self.metric, "seed": self.seed}

    def prepare(self, tokenizer, seed: int) -> None:

        self.tokenizer = tokenizer
        self.seed = seed
        self.task_manager = self.check_available()

    def check_available(self) -> Any:
        """lm-eval's TaskManager that knows this task; ValueError (before any model loads) if none does."""
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as error:
            raise ValueError(f"task {self.name!r} needs lm-eval: pip install lm-eval") from error
        # Indexing lm-eval's thousands of built-in YAMLs takes a while: only for tasks not shipped here.
        shipped = self.lm_eval_task in shipped_task_names()
        manager = TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=not shipped)
        if self.lm_eval_task not in manager.all_tasks:
            raise ValueError(
                f"lm-eval knows no task {self.lm_eval_task!r}; the shipped offline tasks are {shipped_task_names()}"
            )
        return manager

    def evaluate(self, model, tokenizer, progress: bool = False) -> dict[str, float]:
        import lm_eval

        if self.task_manager is None:
            raise ValueError("call prepare(tokenizer, seed) before evaluate")
        lm = lm_eval_model_class()(pretrained=model, tokenizer=tokenizer)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[self.lm_eval_task],
            task_manager=self.task_manager,
            limit=self.limit,
            log_samples=False,
            random_seed=self.seed,
            numpy_random_seed=self.seed,
            torch_random_seed=self.seed,
            fewshot_random_seed=self.seed,
        )
        figures = results["results"][self.lm_eval_task]
        out = {}
        for key, value in figures.items():
            if isinstance(value, (int, float)) and "," in key and "stderr" not in key:
                out[key.split(",")[0]] = float(value)
        if self.metric not in out:
            raise ValueError(f"lm-eval task {self.lm_eval_task!r} reports {sorted(out)}, not {self.metric!r}")
        return out


def shipped_task_names() -> list[str]:
    """Names of the offline task YAMLs shipped in lm_eval_tasks/."""
    return sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))

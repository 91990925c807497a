"""Where a decode step's time goes: timers on the model's modules, its cache update and its attention function.

`stage_timers` installs forward hooks on the modules of a transformers decoder (embedding, norms,
q/k/v/o projections, MLP, output projection, each layer's attention module), wraps the cache's
`update` (K/V, and the labels of a label cache) and the attention function registered under the
model's attention implementation (SDPA for dense, doublesparse's for Double Sparsity), and adds up the
seconds of each stage for the steps run inside it. Derived stages: what the attention module spends
outside its projections, cache update and attention function (RoPE, reshapes), and what the step
spends outside every module (masks, Python and dispatch between the ops). Timed steps never run
under these hooks; the benchmark runs extra steps for the breakdown.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

STAGES = (
    "embedding",
    "norms",
    "projections",
    "rope and reshapes",
    "cache update",
    "attention",
    "mlp",
    "output projection",
    "other",
)
# Short names for the printed table.
LABELS = {
    "embedding": "embed",
    "norms": "norms",
    "projections": "q/k/v/o",
    "rope and reshapes": "rope etc",
    "cache update": "cache upd",
    "attention": "attention",
    "mlp": "mlp",
    "output projection": "lm_head",
    "other": "other",
}
_ROLES = {
    "q_proj": "projections",
    "k_proj": "projections",
    "v_proj": "projections",
    "o_proj": "projections",
    "qkv_proj": "projections",
    "mlp": "mlp",
    "lm_head": "output projection",
    "embed_tokens": "embedding",
    "self_attn": "attention module",
}


def _role(name: str) -> str | None:
    last = name.rsplit(".", 1)[-1]
    if last in _ROLES:
        return _ROLES[last]
    if not last.endswith("norm"):
        return None
    # A norm inside the attention module (Qwen3's q_norm, k_norm) is not part of its "rope and reshapes".
    return "norms in attention" if ".self_attn." in f".{name}." else "norms"


@contextlib.contextmanager
def stage_timers(model: Any, cache: Any) -> Iterator[dict[str, float]]:
    """Seconds per stage (see STAGES, plus 'attention module'), summed over the steps run inside."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seconds: dict[str, float] = defaultdict(float)
    started: list[float] = []
    handles = []

    def timed(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start

        return wrapper

    for name, module in model.named_modules():
        stage = _role(name)
        if stage is None:
            continue

        def before(module: Any, args: Any) -> None:
            started.append(time.perf_counter())

        def after(module: Any, args: Any, output: Any, stage: str = stage) -> None:
            seconds[stage] += time.perf_counter() - started.pop()

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    name = model.config._attn_implementation
    attention = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = timed("attention", attention)
    cache.update = timed("cache update", cache.update)  # an instance attribute, over the class's method
    try:
        yield seconds
    finally:
        del cache.update
        ALL_ATTENTION_FUNCTIONS[name] = attention
        for handle in handles:
            handle.remove()


def stage_milliseconds(seconds: dict[str, float], step_seconds: float) -> dict[str, float]:
    """One step's stages in ms, with the derived ones: the attention module's rest, and the step's 'other'."""
    inside = sum(seconds.get(s, 0.0) for s in ("projections", "cache update", "attention", "norms in attention"))
    stages = {stage: seconds.get(stage, 0.0) for stage in STAGES}
    stages["norms"] += seconds.get("norms in attention", 0.0)
    stages["rope and reshapes"] = max(0.0, seconds.get("attention module", 0.0) - inside)
    modules = sum(seconds.get(s, 0.0) for s in ("embedding", "norms", "attention module", "mlp", "output projection"))
    stages["other"] = max(0.0, step_seconds - modules)
    return {stage: 1e3 * value for stage, value in stages.items()}

"""The registry of evaluated methods: name -> factory, so tests and commands can loop over all of them."""

from __future__ import annotations

from typing import Any, Callable

from .base import Method
from .baselines import DenseMethod, H2OMethod, OracleTopKMethod, QuestMethod, SparQMethod, StreamingLLMMethod
from .double_sparsity import DoubleSparsityMethod, RandomChannelsMethod
from .names import METHOD_NAMES


def method_registry() -> dict[str, Callable[[], Method]]:
    """Method name -> factory of a method with default options."""
    return {
        "dense": DenseMethod,
        "double_sparsity": DoubleSparsityMethod,
        "oracle_topk": OracleTopKMethod,
        "random_channels": RandomChannelsMethod,
        "streaming_llm": StreamingLLMMethod,
        "h2o": H2OMethod,
        "quest": QuestMethod,
        "sparq": SparQMethod,
    }


if tuple(method_registry()) != METHOD_NAMES:  # pragma: no cover - a registry edit without names.py
    raise ImportError("eval/methods/names.py must list the registry's methods in order")


def make_method(name: str, **options: Any) -> Method:
    """A method by registry name, or a variant `name+FIELD=VALUE...` (see variants.py); ValueError naming the
    known ones otherwise."""
    from .variants import VariantMethod, split_variant

    base, overrides = split_variant(name)
    registry = method_registry()
    if base not in registry:
        raise ValueError(f"unknown method {base!r}; known methods are {', '.join(registry)}")
    try:
        method = registry[base](**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for method {base!r}: {error}") from error
    return VariantMethod(name, method, overrides) if overrides else method

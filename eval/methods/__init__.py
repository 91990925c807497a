"""Token-selection methods compared by the evaluation harness: one small class per method, one registry.

- `base`: the contract (`Method`, `SelectiveMethod`) and the selective attention the baselines share;
- `prefix`: a prompt prefilled densely once, from which every method continues (`Prefix`, `dense_prefix`);
- `double_sparsity`: `double_sparsity` and `random_channels`, run by `doublesparse.apply` itself;
- `baselines`: `dense`, `oracle_topk`, `sparq`, `streaming_llm`, `h2o`, `quest`;
- `registry`: name -> method (`make_method`, `METHOD_NAMES`); `names`: the names alone, without torch.

Attributes load on first use, so that command-line help can list the names without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METHOD_NAMES": "names",
    "Method": "base",
    "SelectiveMethod": "base",
    "make_method": "registry",
    "method_registry": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

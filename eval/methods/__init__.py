"""Token-selection methods compared by the evaluation harness: one small class per method, one registry.

- `base`: the contract (`Method`, `SelectiveMethod`) and the selective attention the baselines share;
- `double_sparsity`: `double_sparsity` and `random_channels`, run by `doublesparse.apply` itself;
- `baselines`: `dense`, `oracle_topk`, `sparq`, `streaming_llm`, `h2o`, `quest`;
- `registry`: name -> method (`make_method`, `METHOD_NAMES`).
"""

from .base import Method, SelectiveMethod
from .registry import METHOD_NAMES, make_method, method_registry

__all__ = ["METHOD_NAMES", "Method", "SelectiveMethod", "make_method", "method_registry"]

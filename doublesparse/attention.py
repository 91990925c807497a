"""The Double Sparsity attention function, registered with transformers' attention interface.

transformers calls it for every attention layer after the cache update, with post-RoPE q/k/v. It
reads the layer's `LayerPlan` from the module, and the patch hands it the layer's cache layer
(`LAYER_KWARG`) and, inside `generate`, the prompt's length (`PROMPT_KWARG`). Every call's keyword
arguments are checked first (support.py): what doublesparse does not understand is refused by name,
also on the dense paths, which would drop it too; learned sinks and softcapping are served on every path
(step.py). Keys and values may have heads of their own sizes (multi-head latent attention). Dense layers,
training, and sliding-window calls attend densely; otherwise the cache layer runs the step it knows how to
run (`SparseLayer.attend`: growing, preallocated or offloaded, see cache.py and offload/), and without a
label cache the step makes labels from the keys it got.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .label_attention import attend_over_labels
from .plan import LayerPlan
from .step import AttentionCall, SparseLayer, dense_attention
from .support import check_attention_kwargs, check_head_sizes

ATTENTION_NAME = "doublesparse"
PLAN_ATTRIBUTE = "_doublesparse_plan"
LAYER_KWARG = "doublesparse_cache_layer"
PROMPT_KWARG = "doublesparse_prompt_rows"

__all__ = [
    "ATTENTION_NAME",
    "LAYER_KWARG",
    "PLAN_ATTRIBUTE",
    "PROMPT_KWARG",
    "dense_attention",
    "double_sparse_attention",
]


def double_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function: q [B, H_q, L, d_k], k [B, H_kv, T, d_k], v [B, H_kv, T, d_v] -> ([B, L, H_q, d_v],
    None)."""
    layer = kwargs.pop(LAYER_KWARG, None)
    prompt_rows = kwargs.pop(PROMPT_KWARG, None)
    check_attention_kwargs(module, kwargs, query.shape[1])
    check_head_sizes(module, query, key, value)
    call = AttentionCall(module, query, key, value, attention_mask, dropout, scaling, kwargs, prompt_rows)
    plan: Optional[LayerPlan] = getattr(module, PLAN_ATTRIBUTE, None)
    if plan is None or plan.dense or module.training or kwargs.get("sliding_window"):
        return call.dense()
    plan.check_heads(query, key)
    if isinstance(layer, SparseLayer):
        return layer.attend(call, plan)
    return attend_over_labels(call, plan)

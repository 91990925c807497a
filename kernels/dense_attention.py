"""Dense decode attention: every cached key, the baseline that Double Sparsity is measured against.

Same layout as sparse attention (query [B, H_q, L, d_k], keys [B, H_kv, T, d_k], values [B, H_kv, T, d_v],
GQA without repeating K/V; out [B, H_q, L, d_v]), the same optional `sinks` and `softcap` (see
sparse_attention.py), and the Triton path runs the very same split-K flash-decoding kernels with the
selection replaced by "every token", so dense and sparse are timed on equal terms.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention_math import cap_logits, check_attention_inputs, softmax_with_sinks
from .flash_decode import flash_decode_triton


def dense_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Torch reference: out [B, H_q, L, d_v] in the query dtype; valid [B, L, T] bool or None (all).

    Rows with no valid key return zeros (with or without a sink).
    """
    check_attention_inputs(query, keys, values, sinks, softcap)
    batch, num_q_heads, rows, key_dim = query.shape
    num_kv_heads, value_dim = keys.shape[1], values.shape[3]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    per_kv = num_q_heads // num_kv_heads
    # Query heads of a KV group stacked as rows of one matmul: K and V are never repeated.
    queries = query.float().reshape(batch, num_kv_heads, per_kv * rows, key_dim)
    logits = cap_logits(torch.matmul(queries, keys.float().transpose(-1, -2)) * scaling, softcap)
    if valid is not None:
        logits = logits.view(batch, num_kv_heads, per_kv, rows, -1).masked_fill(~valid[:, None, None], float("-inf"))
        logits = logits.view(batch, num_kv_heads, per_kv * rows, -1)
    sink_logits = None
    if sinks is not None:  # query head kv * per_kv + g sits at rows g * L ... g * L + L - 1 of its KV head
        sink_logits = sinks.float().reshape(num_kv_heads, per_kv, 1, 1).expand(-1, -1, rows, 1)
        sink_logits = sink_logits.reshape(1, num_kv_heads, per_kv * rows, 1)
    weights = softmax_with_sinks(logits, sink_logits)
    out = torch.matmul(weights, values.float())
    return out.view(batch, num_q_heads, rows, value_dim).to(query.dtype)


def dense_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Triton dense flash decoding: same result as `dense_attention_reference`."""
    keep = None if valid is None else valid[:, None]
    return flash_decode_triton(
        query, keys, values, scaling, None, keep, out=out, num_splits=num_splits, sinks=sinks, softcap=softcap
    )

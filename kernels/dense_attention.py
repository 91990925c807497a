"""Dense decode attention: every cached key, the baseline that Double Sparsity is measured against.

Same layout as sparse attention (query [B, H_q, L, d], keys/values [B, H_kv, T, d], GQA without
repeating K/V), and the Triton path runs the very same split-K flash-decoding kernels with the
selection replaced by "every token", so dense and sparse are timed on equal terms.
"""

from __future__ import annotations

from typing import Optional

import torch

from .sparse_attention import flash_decode_triton


def dense_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference: out [B, H_q, L, d] in the query dtype; valid [B, L, T] bool or None (all).

    Rows with no valid key return zeros.
    """
    batch, num_q_heads, rows, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    per_kv = num_q_heads // num_kv_heads
    # Query heads of a KV group stacked as rows of one matmul: K and V are never repeated.
    queries = query.float().reshape(batch, num_kv_heads, per_kv * rows, head_dim)
    logits = torch.matmul(queries, keys.float().transpose(-1, -2)) * scaling
    if valid is not None:
        logits = logits.view(batch, num_kv_heads, per_kv, rows, -1).masked_fill(~valid[:, None, None], float("-inf"))
        logits = logits.view(batch, num_kv_heads, per_kv * rows, -1)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.matmul(weights, values.float())
    return out.view(batch, num_q_heads, rows, head_dim).to(query.dtype)


def dense_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Triton dense flash decoding: same result as `dense_attention_reference`."""
    keep = None if valid is None else valid[:, None]
    return flash_decode_triton(query, keys, values, scaling, None, keep, out=out, num_splits=num_splits)

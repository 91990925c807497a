"""Sparse attention: exact attention of each query row over its selected tokens only.

Selection heads (H_select) are either the KV heads (one selection shared by a KV group) or the query
heads. Query head h uses selection head h // (H_q // H_select) and KV head h // (H_q // H_kv).
"""

from __future__ import annotations

import torch


def _per_query_head(tensor: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    return tensor.repeat_interleave(num_q_heads // tensor.shape[1], dim=1)


def sparse_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Torch reference by gathering the selected rows: out [B, H_q, L, d] in the query dtype.

    query [B, H_q, L, d]; keys/values [B, H_kv, T, d]; indices [B, H_select, L, K];
    slot_valid broadcastable to indices. Rows with no valid slot return zeros.
    """
    batch, num_q_heads, rows, head_dim = query.shape
    slots = indices.shape[-1]
    index = _per_query_head(indices, num_q_heads).reshape(batch, num_q_heads, rows * slots, 1)
    index = index.expand(-1, -1, -1, head_dim)
    picked_keys = torch.gather(_per_query_head(keys, num_q_heads), 2, index).view(batch, num_q_heads, rows, slots, head_dim)
    picked_values = torch.gather(_per_query_head(values, num_q_heads), 2, index).view(batch, num_q_heads, rows, slots, head_dim)
    logits = torch.einsum("bhld,bhlkd->bhlk", query.float(), picked_keys.float()) * scaling
    keep = _per_query_head(slot_valid.expand(batch, -1, -1, -1), num_q_heads) if slot_valid.shape[1] > 1 else slot_valid
    logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhlk,bhlkd->bhld", weights, picked_values.float())
    return out.to(query.dtype)


def selection_mask(indices: torch.Tensor, slot_valid: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, H_select, L, T]: True where a row selected that key."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, slot_valid.expand_as(indices))


def masked_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Torch reference for many rows at once: dense logits, all but the selected keys masked out.

    Same result as `sparse_attention_reference` with O(L*T) memory instead of O(L*K*d), which is
    what teacher-forced (simulate) evaluation of long prompts needs. selected: [B, H_select, L, T].
    """
    num_q_heads = query.shape[1]
    logits = torch.matmul(query.float(), _per_query_head(keys, num_q_heads).float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~_per_query_head(selected, num_q_heads), float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.matmul(weights, _per_query_head(values, num_q_heads).float()).to(query.dtype)

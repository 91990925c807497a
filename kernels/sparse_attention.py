"""Sparse attention: exact attention of each query row over its selected tokens only.

Selection heads (H_select) are either the KV heads (one selection shared by a KV group) or the query
heads. Query head h uses selection head h // (H_q // H_select) and KV head h // (H_q // H_kv).

Shapes: query [B, H_q, L, d_k], keys [B, H_kv, T, d_k], values [B, H_kv, T, d_v] -> out [B, H_q, L, d_v]
in the query dtype. The value width may differ from the key width (MLA as transformers implements
DeepSeek-V2/V3: keys of qk_nope_head_dim + qk_rope_head_dim, values of v_head_dim).

Two optional, keyword-only model features, matched to transformers' eager attention of the model:
- `sinks` [H_q] (gpt-oss `s_aux`): one learned logit per query head that joins each row's softmax
  denominator and attends to nothing, so weights over the keys sum to less than one. A row with no
  valid key then returns zeros, as the eager attention does with every key masked.
- `softcap` (Gemma2 `attn_logit_softcapping`): logits = tanh(logits / softcap) * softcap, after the
  scaling and before the mask.
Everything is computed in fp32 (the eager attentions run the logits in the model dtype; gpt-oss's
even its softmax), which only removes rounding.

The Triton path is flash-decoding over the selection (flash_decode.py); the input checks, softcapping
and softmax with sinks every path shares are in attention_math.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention_math import cap_logits, check_attention_inputs, softmax_with_sinks
from .flash_decode import flash_decode_triton
from .scratch import Scratch, scratch_or_new


def _per_query_head(tensor: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    return tensor.repeat_interleave(num_q_heads // tensor.shape[1], dim=1)


def take_rows(cache: torch.Tensor, indices: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `indices` [B, H, N] of each head of `cache` [B, H, T, d] -> [B, H, N, d] (into `out` if given)."""
    batch, heads, length, head_dim = cache.shape
    if cache.is_contiguous():
        # One index_select over the flattened cache: several times faster on CPU than gather with an
        # index expanded over d, and it reads only the selected rows.
        first_row = torch.arange(batch * heads, device=cache.device).view(batch, heads, 1) * length
        rows = (indices + first_row).reshape(-1)
        flat_out = None if out is None else out.view(-1, head_dim)
        return torch.index_select(cache.view(-1, head_dim), 0, rows, out=flat_out).view(batch, heads, -1, head_dim)
    index = indices[..., None].expand(-1, -1, -1, head_dim)
    return torch.gather(cache, 2, index) if out is None else torch.gather(cache, 2, index, out=out)


def sparse_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    scratch: Optional[Scratch] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Torch reference by gathering the selected rows: out [B, H_q, L, d_v] in the query dtype.

    query [B, H_q, L, d_k]; keys [B, H_kv, T, d_k]; values [B, H_kv, T, d_v]; indices [B, H_select, L, K];
    slot_valid broadcastable to indices; sinks [H_q] and softcap as in the module docstring. Rows with
    no valid slot return zeros. With `scratch`, the gathered rows live in its buffers (see scratch.py).
    """
    check_attention_inputs(query, keys, values, sinks, softcap)
    batch, num_q_heads, rows, key_dim = query.shape
    num_kv_heads, value_dim = keys.shape[1], values.shape[3]
    num_select_heads, slots = indices.shape[1], indices.shape[-1]
    if num_select_heads % num_kv_heads:
        return _sparse_attention_per_query_head(
            query, keys, values, indices, slot_valid, scaling, sinks=sinks, softcap=softcap
        )
    # Query heads viewed as [B, H_kv, S, G, ...] (S selection heads per KV head, G query heads per
    # selection): only the selected rows are gathered, once per selection head, and never repeated.
    per_kv = num_select_heads // num_kv_heads
    per_select = num_q_heads // num_select_heads
    index = indices.reshape(batch, num_kv_heads, per_kv * rows * slots)
    picked_shape = (*index.shape, key_dim)
    # Ops with out= are not differentiable: where autograd records, the rows are gathered into new tensors.
    picked_out = None
    if not _recorded(query, keys, values):
        picked_out = scratch_or_new(scratch, "picked_keys", picked_shape, keys.dtype, keys.device)
    picked_keys = take_rows(keys, index, picked_out)
    picked_keys = picked_keys.float().view(batch, num_kv_heads, per_kv, rows, slots, key_dim)
    queries = query.float().view(batch, num_kv_heads, per_kv, per_select, rows, key_dim).transpose(3, 4)
    logits = torch.matmul(queries, picked_keys.transpose(-1, -2)) * scaling  # [B, H_kv, S, L, G, K]
    logits = cap_logits(logits, softcap)
    keep = slot_valid.expand(batch, -1, rows, slots)
    if keep.shape[1] > 1:
        keep = keep.reshape(batch, num_kv_heads, per_kv, rows, 1, slots)
    else:
        keep = keep.reshape(batch, 1, 1, rows, 1, slots)
    logits = logits.masked_fill(~keep, float("-inf"))
    sink_logits = None if sinks is None else sinks.float().reshape(1, num_kv_heads, per_kv, 1, per_select, 1)
    weights = softmax_with_sinks(logits, sink_logits)
    out = weighted_rows(values, index, weights, scratch)  # [B, H_kv, S, L, G, d_v]
    return out.transpose(3, 4).reshape(batch, num_q_heads, rows, value_dim).to(query.dtype)


def weighted_rows(
    values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, scratch: Optional[Scratch] = None
) -> torch.Tensor:
    """Sum of rows `index` [B, H, S*L*K] of `values` [B, H, N, d] by `weights` [B, H, S, L, G, K]: [B, H, S, L, G, d].

    d is the values' own width (it need not be the keys'). fp32 values go through embedding_bag, which
    sums the rows as it reads them: on the CPU about seven times faster than gathering them first and
    multiplying (measured at 32K context, batch 4).
    """
    batch, heads, length, head_dim = values.shape
    *outer, per_select, slots = weights.shape
    if values.dtype == torch.float32 and values.is_contiguous():
        first_row = torch.arange(batch * heads, device=values.device).view(batch, heads, 1) * length
        rows = (index + first_row).view(*outer, 1, slots).expand(*outer, per_select, slots).reshape(-1)
        offsets = torch.arange(0, rows.numel(), slots, device=values.device)
        summed = torch.nn.functional.embedding_bag(
            rows, values.view(-1, head_dim), offsets, mode="sum", per_sample_weights=weights.reshape(-1)
        )
        return summed.view(*outer, per_select, head_dim)
    picked_out = None
    if not _recorded(values, weights):
        picked_out = scratch_or_new(scratch, "picked_values", (*index.shape, head_dim), values.dtype, values.device)
    picked = take_rows(values, index, picked_out)
    return torch.matmul(weights, picked.float().view(*outer, slots, head_dim))


def _recorded(*tensors: torch.Tensor) -> bool:
    """Whether autograd records ops on these tensors (out= buffers cannot be used then)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sparse_attention_per_query_head(
    query, keys, values, indices, slot_valid, scaling, *, sinks=None, softcap=None
) -> torch.Tensor:
    # Plain form for selection heads that span several KV heads (fewer selection heads than KV heads).
    batch, num_q_heads, rows, key_dim = query.shape
    value_dim, slots = values.shape[3], indices.shape[-1]
    index = _per_query_head(indices, num_q_heads).reshape(batch, num_q_heads, rows * slots, 1)
    picked_keys = torch.gather(_per_query_head(keys, num_q_heads), 2, index.expand(-1, -1, -1, key_dim))
    picked_keys = picked_keys.view(batch, num_q_heads, rows, slots, key_dim)
    picked_values = torch.gather(_per_query_head(values, num_q_heads), 2, index.expand(-1, -1, -1, value_dim))
    picked_values = picked_values.view(batch, num_q_heads, rows, slots, value_dim)
    logits = cap_logits(torch.einsum("bhld,bhlkd->bhlk", query.float(), picked_keys.float()) * scaling, softcap)
    keep = _per_query_head(slot_valid.expand(batch, -1, -1, -1), num_q_heads) if slot_valid.shape[1] > 1 else slot_valid
    logits = logits.masked_fill(~keep, float("-inf"))
    weights = softmax_with_sinks(logits, None if sinks is None else sinks.float().reshape(1, num_q_heads, 1, 1))
    out = torch.einsum("bhlk,bhlkd->bhld", weights, picked_values.float())
    return out.to(query.dtype)


def selection_mask(indices: torch.Tensor, slot_valid: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, H_select, L, T]: True where a row selected that key."""
    # Invalid slots may repeat a selected index (the native selection fills them so): they point at an
    # extra column that is cut off, so their writes never race with a valid slot's.
    slots = torch.where(slot_valid.expand_as(indices), indices, length)
    mask = torch.zeros(*indices.shape[:-1], length + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, slots, True)[..., :length]


def masked_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: torch.Tensor,
    scaling: float,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Torch reference for many rows at once: dense logits, all but the selected keys masked out.

    Same result as `sparse_attention_reference` with O(L*T) memory instead of O(L*K*d), which is
    what teacher-forced (simulate) evaluation of long prompts needs. selected: [B, H_select, L, T];
    out [B, H_q, L, d_v]; sinks and softcap as in the module docstring.
    """
    check_attention_inputs(query, keys, values, sinks, softcap)
    num_q_heads = query.shape[1]
    logits = torch.matmul(query.float(), _per_query_head(keys, num_q_heads).float().transpose(-1, -2)) * scaling
    logits = cap_logits(logits, softcap).masked_fill(~_per_query_head(selected, num_q_heads), float("-inf"))
    weights = softmax_with_sinks(logits, None if sinks is None else sinks.float().reshape(1, num_q_heads, 1, 1))
    return torch.matmul(weights, _per_query_head(values, num_q_heads).float()).to(query.dtype)


def sparse_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    out: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Triton sparse attention: same result as `sparse_attention_reference` ([B, H_q, L, d_v])."""
    return flash_decode_triton(
        query, keys, values, scaling, indices, slot_valid, out=out, num_splits=num_splits, sinks=sinks, softcap=softcap
    )


def sparse_attention_cpu_supports(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> bool:
    """Whether `sparse_attention_cpu` takes these inputs (else the reference serves them)."""
    from . import native_ops

    num_q_heads, head_dim = query.shape[1], query.shape[3]
    num_kv_heads, num_select_heads = keys.shape[1], indices.shape[1]
    return (
        # The native kernel knows one head size for keys and values, and neither sinks nor softcapping.
        sinks is None
        and softcap is None
        and values.shape[3] == head_dim
        and query.device.type == keys.device.type == values.device.type == "cpu"
        and keys.dtype == values.dtype
        and keys.dtype in native_ops.ROW_KINDS
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and num_select_heads % num_kv_heads == 0
        and num_q_heads % num_select_heads == 0
        and native_ops.sparse_attention_limits_hold(num_q_heads, num_select_heads, head_dim)
    )


def sparse_attention_cpu(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Native CPU sparse attention (cpu_decode.c): same result as the reference, selected rows read in place."""
    from . import native, native_ops  # native_ops registers the ops; the library is built at first use

    native.require_native()
    if not sparse_attention_cpu_supports(query, keys, values, indices):
        limits = native.native_limits()
        raise ValueError(
            "native sparse attention takes CPU K/V of one dtype (fp32/fp16/bf16) with the same strides and contiguous "
            f"rows, whole KV heads per selection head, at most {limits.max_group_heads} query heads per selection, "
            f"head_dim at most {limits.max_head_dim} and (query heads per selection) x head_dim at most "
            f"{limits.max_group_accumulator}; use backend='torch'"
        )
    if torch.compiler.is_compiling():  # one graph node; eager skips the dispatcher (see native_ops.py)
        out = torch.ops.doublesparse.sparse_attention(query, keys, values, indices, slot_valid, float(scaling))
        return out.to(query.dtype)
    batch, num_q_heads, rows, head_dim = query.shape
    num_select_heads, slots = indices.shape[1], indices.shape[-1]
    per_select = num_q_heads // num_select_heads
    weights = scratch_or_new(
        scratch, "attend_weights", (batch, num_select_heads, rows, per_select, slots), torch.float32, query.device
    )
    out = scratch_or_new(scratch, "attend_out", (batch, num_q_heads, rows, head_dim), torch.float32, query.device)
    native_ops.sparse_attention_into(query, keys, values, indices, slot_valid, scaling, weights, out)
    return out.to(query.dtype)

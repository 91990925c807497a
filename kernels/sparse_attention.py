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

The Triton path is flash-decoding over the selection: the K selected slots are split across programs
(split-K), each program attends all the query heads that share one selection, so every selected K/V
row is read once per selection head, and a second kernel merges the splits. The same kernels serve
dense decode (dense_attention.py), where the "selection" is every cached token.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .scratch import Scratch, scratch_or_new

try:  # the torch references must import where triton is missing (e.g. macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


def _per_query_head(tensor: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    return tensor.repeat_interleave(num_q_heads // tensor.shape[1], dim=1)


def check_attention_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> None:
    """Raise ValueError where keys, values, sinks or softcap do not fit query [B, H_q, L, d_k]."""
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [B, H_kv, T, d_k] and "
            "[B, H_kv, T, d_v] with the same batch, KV heads and tokens (only the head sizes may differ)"
        )
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query head size {query.shape[-1]} must equal the key head size {keys.shape[-1]}")
    num_q_heads = query.shape[1]
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_q_heads or not sinks.is_floating_point()):
        raise ValueError(
            f"sinks must be one float logit per query head, shape [{num_q_heads}]; "
            f"got {sinks.dtype} {tuple(sinks.shape)}"
        )
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(
            f"softcap must be a positive finite number (Gemma2's attn_logit_softcapping) or None, got {softcap!r}"
        )


def cap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """tanh(logits / softcap) * softcap, as Gemma2 caps them; `logits` itself when softcap is None."""
    # Before the mask: capping a masked -inf would turn it into -softcap, a weight above zero.
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def softmax_with_sinks(logits: torch.Tensor, sink_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim with `sink_logits` (broadcast to logits[..., :1]) in each denominator; NaN -> 0."""
    # The sink is one more column of logits that is dropped after the softmax, as gpt-oss's eager
    # attention does: it only enlarges the denominator.
    if sink_logits is None:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    column = sink_logits.to(device=logits.device, dtype=logits.dtype).expand(*logits.shape[:-1], 1)
    weights = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]
    return weights.nan_to_num(0.0)  # NaN only where the sink is -inf too and no key is valid


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


if triton is not None:

    @triton.jit
    def _soft_cap(logits, SOFTCAP: tl.constexpr):
        # tanh(logits / SOFTCAP) * SOFTCAP. Triton's core language has no tanh (libdevice's does not run
        # under the interpreter), so it is built from exp: (1 - e^-2|x|) / (1 + e^-2|x|) with the sign of
        # x, which never overflows; below |x| = 1/8 that form loses digits to cancellation, and the odd
        # Taylor series to x^7 is exact to fp32 rounding there (next term < 3e-10).
        x = logits / SOFTCAP
        magnitude = tl.abs(x)
        decay = tl.exp(-2.0 * magnitude)
        large = (1.0 - decay) / (1.0 + decay)
        square = x * x
        small = magnitude * (1.0 + square * (-1.0 / 3.0 + square * (2.0 / 15.0 + square * (-17.0 / 315.0))))
        capped = tl.where(magnitude < 0.125, small, large)
        return tl.where(x < 0, -capped, capped) * SOFTCAP

    @triton.jit
    def _decode_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        index_ptr,
        keep_ptr,
        sinks_ptr,
        part_out_ptr,
        part_max_ptr,
        part_sum_ptr,
        out_ptr,
        num_slots,
        slots_per_split,
        num_rows,
        scaling,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_qd,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_od,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_ib,
        stride_ih,
        stride_il,
        stride_ik,
        stride_eb,
        stride_eh,
        stride_el,
        stride_ek,
        HEADS_PER_PROGRAM: tl.constexpr,
        QUERY_PER_KV: tl.constexpr,
        KEY_DIM: tl.constexpr,
        VALUE_DIM: tl.constexpr,
        DENSE: tl.constexpr,
        HAS_KEEP: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        # One program: the query heads that share one selection (a whole KV group for selection="group"),
        # one query row, one split of the selected slots. Partial results are unnormalised.
        # SOFTCAP 0 means no capping; sinks enter only where a row's splits are normalised (here when
        # there is one split, else in the merge), so each row counts its sink once.
        split = tl.program_id(0)
        unit = tl.program_id(1)
        batch = tl.program_id(2) // num_rows
        row = tl.program_id(2) % num_rows
        num_splits = tl.num_programs(0)
        heads = unit * HEADS_PER_PROGRAM + tl.arange(0, BLOCK_H)
        head_ok = tl.arange(0, BLOCK_H) < HEADS_PER_PROGRAM
        kv_head = (unit * HEADS_PER_PROGRAM) // QUERY_PER_KV
        key_dims = tl.arange(0, BLOCK_DK)
        key_dim_ok = key_dims < KEY_DIM
        value_dims = tl.arange(0, BLOCK_DV)
        value_dim_ok = value_dims < VALUE_DIM
        q_tile = (
            q_ptr + batch * stride_qb + heads[:, None] * stride_qh + row * stride_ql + key_dims[None, :] * stride_qd
        )
        queries = tl.load(q_tile, mask=head_ok[:, None] & key_dim_ok[None, :], other=0.0).to(tl.float32)
        running_max = tl.full((BLOCK_H,), -float("inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
        start = split * slots_per_split
        end = tl.minimum(start + slots_per_split, num_slots)
        for first in range(start, end, BLOCK_K):
            slots = first + tl.arange(0, BLOCK_K)
            slot_ok = slots < end
            if DENSE:
                tokens = slots
            else:
                index_row = index_ptr + batch * stride_ib + unit * stride_ih + row * stride_il
                tokens = tl.load(index_row + slots * stride_ik, mask=slot_ok, other=0)
            if HAS_KEEP:
                keep_row = keep_ptr + batch * stride_eb + unit * stride_eh + row * stride_el
                slot_ok = slot_ok & (tl.load(keep_row + slots * stride_ek, mask=slot_ok, other=0) != 0)
            k_rows = (
                k_ptr
                + batch * stride_kb
                + kv_head * stride_kh
                + tokens[:, None] * stride_kt
                + key_dims[None, :] * stride_kd
            )
            keys = tl.load(k_rows, mask=slot_ok[:, None] & key_dim_ok[None, :], other=0.0).to(tl.float32)
            logits = tl.dot(queries, tl.trans(keys), input_precision="ieee") * scaling
            if SOFTCAP > 0:
                logits = _soft_cap(logits, SOFTCAP)
            logits = tl.where(slot_ok[None, :], logits, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            # A head with no valid slot yet keeps max -inf: subtract 0 instead, so exp gives 0, not NaN.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            probs = tl.exp(logits - shift[:, None])
            rescale = tl.exp(running_max - shift)
            v_rows = (
                v_ptr
                + batch * stride_vb
                + kv_head * stride_vh
                + tokens[:, None] * stride_vt
                + value_dims[None, :] * stride_vd
            )
            values = tl.load(v_rows, mask=slot_ok[:, None] & value_dim_ok[None, :], other=0.0).to(tl.float32)
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            acc = acc * rescale[:, None] + tl.dot(probs, values, input_precision="ieee")
            running_max = new_max
        if SINGLE_SPLIT:  # one split: normalise here and skip the merge launch
            total = running_sum
            if HAS_SINKS:
                sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0)
                overall = tl.maximum(running_max, sink)
                sink_shift = tl.where(overall == -float("inf"), 0.0, overall)
                to_overall = tl.exp(running_max - sink_shift)
                acc = acc * to_overall[:, None]
                total = running_sum * to_overall + tl.exp(sink - sink_shift)
            merged = tl.where(total[:, None] > 0, acc / tl.where(total > 0, total, 1.0)[:, None], 0.0)
            out = (
                out_ptr
                + batch * stride_ob
                + heads[:, None] * stride_oh
                + row * stride_ol
                + value_dims[None, :] * stride_od
            )
            tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & value_dim_ok[None, :])
        else:
            # Partials are contiguous [B, H_q, L, splits(, d_v)].
            part = ((batch * (tl.num_programs(1) * HEADS_PER_PROGRAM) + heads) * num_rows + row) * num_splits + split
            tl.store(part_max_ptr + part, running_max, mask=head_ok)
            tl.store(part_sum_ptr + part, running_sum, mask=head_ok)
            tl.store(
                part_out_ptr + part[:, None] * VALUE_DIM + value_dims[None, :],
                acc,
                mask=head_ok[:, None] & value_dim_ok[None, :],
            )

    @triton.jit
    def _decode_merge_kernel(
        part_out_ptr,
        part_max_ptr,
        part_sum_ptr,
        sinks_ptr,
        out_ptr,
        num_splits,
        num_q_heads,
        num_rows,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_od,
        VALUE_DIM: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        # One program per (batch, query head, row): merge the splits' softmax pieces. The sink is one
        # more term of the log-sum-exp, with its exp(sink - M) in the denominator only, and the overall
        # maximum M covers it too.
        flat = tl.program_id(0)
        row = flat % num_rows
        head = (flat // num_rows) % num_q_heads
        batch = flat // (num_rows * num_q_heads)
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        dims = tl.arange(0, BLOCK_DV)
        dim_ok = dims < VALUE_DIM
        maxima = tl.load(part_max_ptr + flat * num_splits + splits, mask=split_ok, other=-float("inf"))
        sums = tl.load(part_sum_ptr + flat * num_splits + splits, mask=split_ok, other=0.0)
        overall = tl.max(maxima, axis=0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head)
            overall = tl.maximum(overall, sink)
        shift = tl.where(overall == -float("inf"), 0.0, overall)
        weights = tl.exp(maxima - shift)
        total = tl.sum(weights * sums, axis=0)
        if HAS_SINKS:
            total = total + tl.exp(sink - shift)
        parts = tl.load(
            part_out_ptr + (flat * num_splits + splits)[:, None] * VALUE_DIM + dims[None, :],
            mask=split_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        merged = tl.sum(weights[:, None] * parts, axis=0)
        # A row with no valid slot returns zeros.
        merged = tl.where(total > 0, merged / tl.where(total > 0, total, 1.0), 0.0)
        out = out_ptr + batch * stride_ob + head * stride_oh + row * stride_ol + dims * stride_od
        tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=dim_ok)


def _default_splits(slots: int, programs: int, block: int, device: torch.device) -> int:
    chunks = max(1, triton.cdiv(slots, block))
    if device.type == "cuda":
        # Enough programs to fill the GPU about twice over, each with at least one block of slots.
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(chunks, triton.cdiv(target, max(programs, 1))))
    return max(1, min(chunks, 4))  # the interpreter runs programs one by one: few, long splits


def flash_decode_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    indices: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    out: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    block_slots: Optional[int] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Split-K flash decoding over `indices` [B, H_select, L, K] (None: every cached token) -> [B, H_q, L, d_v].

    keep: bool, broadcastable to [B, H_select, L, K] (or [B, 1, L, T] when dense), or None for all;
    sinks [H_q] and softcap as in the module docstring.
    """
    if triton is None:
        raise ValueError("the Triton attention kernels need triton installed; use backend='torch'")
    check_attention_inputs(query, keys, values, sinks, softcap)
    batch, num_q_heads, rows, key_dim = query.shape
    num_kv_heads, num_tokens, value_dim = keys.shape[1], keys.shape[2], values.shape[3]
    if keys.shape[0] != batch:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} need the query's batch {batch}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    query_per_kv = num_q_heads // num_kv_heads
    if indices is None:
        units, num_slots = num_kv_heads, num_tokens
        index_arg, index_strides = query, (0, 0, 0, 0)  # never read when dense
    else:
        units, num_slots = indices.shape[1], indices.shape[3]
        if indices.shape[0] != batch or indices.shape[2] != rows or units % num_kv_heads or num_q_heads % units:
            raise ValueError(
                f"indices {tuple(indices.shape)} must be [B={batch}, H_select, L={rows}, K] with H_select a multiple "
                f"of H_kv={num_kv_heads} dividing H_q={num_q_heads}"
            )
        index_arg, index_strides = indices, indices.stride()
    heads_per_program = num_q_heads // units
    if keep is not None:
        keep = keep.expand(batch, keep.shape[1], rows, num_slots)
        if keep.shape[1] not in (1, units):
            raise ValueError(f"slot_valid has {keep.shape[1]} heads; use 1 or {units}")
        keep_strides = (keep.stride(0), 0 if keep.shape[1] == 1 else keep.stride(1), keep.stride(2), keep.stride(3))
        keep_arg = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    else:
        keep_arg, keep_strides = query, (0, 0, 0, 0)
    sinks_arg = query if sinks is None else sinks.to(device=query.device, dtype=torch.float32).contiguous()
    out_shape = (batch, num_q_heads, rows, value_dim)
    if out is None:
        # Equal widths keep the query's layout (a [B, L, H, d] view stays one), as before values had their own.
        out = torch.empty_like(query) if value_dim == key_dim else query.new_empty(out_shape)
    elif tuple(out.shape) != out_shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {query.dtype} of shape {out_shape}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if block_slots is None:
        block_slots = 64 if query.is_cuda else 128
    programs = batch * units * rows
    splits = num_splits or _default_splits(num_slots, programs, block_slots, query.device)
    slots_per_split = max(1, triton.cdiv(num_slots, splits))
    splits = max(1, triton.cdiv(num_slots, slots_per_split))
    part_shape = (batch, num_q_heads, rows, splits)
    if splits == 1:  # the kernel writes `out` directly; the partial buffers are never touched
        part_max = part_sum = part_out = out
    else:
        part_max = torch.empty(part_shape, dtype=torch.float32, device=query.device)
        part_sum = torch.empty(part_shape, dtype=torch.float32, device=query.device)
        part_out = torch.empty(*part_shape, value_dim, dtype=torch.float32, device=query.device)
    block_dv = max(16, triton.next_power_of_2(value_dim))
    _decode_partial_kernel[(splits, units, batch * rows)](
        query,
        keys,
        values,
        index_arg,
        keep_arg,
        sinks_arg,
        part_out,
        part_max,
        part_sum,
        out,
        num_slots,
        slots_per_split,
        rows,
        float(scaling),
        *query.stride(),
        *out.stride(),
        *keys.stride(),
        *values.stride(),
        *index_strides,
        *keep_strides,
        HEADS_PER_PROGRAM=heads_per_program,
        QUERY_PER_KV=query_per_kv,
        KEY_DIM=key_dim,
        VALUE_DIM=value_dim,
        DENSE=indices is None,
        HAS_KEEP=keep is not None,
        SINGLE_SPLIT=splits == 1,
        HAS_SINKS=sinks is not None,
        SOFTCAP=0.0 if softcap is None else float(softcap),
        BLOCK_H=max(16, triton.next_power_of_2(heads_per_program)),
        BLOCK_K=block_slots,
        BLOCK_DK=max(16, triton.next_power_of_2(key_dim)),
        BLOCK_DV=block_dv,
    )
    if splits == 1:
        return out
    _decode_merge_kernel[(batch * num_q_heads * rows,)](
        part_out,
        part_max,
        part_sum,
        sinks_arg,
        out,
        splits,
        num_q_heads,
        rows,
        *out.stride(),
        VALUE_DIM=value_dim,
        HAS_SINKS=sinks is not None,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_DV=block_dv,
    )
    return out


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

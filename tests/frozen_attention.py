"""The attention ops verbatim as they were before sinks, softcap and value widths (commit 54685d9).

Kept only to prove that the extended ops, called without the new arguments, return bit-identical
results (tests/test_kernels_attention_extensions.py). Never edit: a change here defeats the proof.
"""

from __future__ import annotations

from typing import Optional

import torch

from doublesparse.kernels.scratch import Scratch, scratch_or_new

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


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
) -> torch.Tensor:
    """Torch reference by gathering the selected rows: out [B, H_q, L, d] in the query dtype.

    query [B, H_q, L, d]; keys/values [B, H_kv, T, d]; indices [B, H_select, L, K];
    slot_valid broadcastable to indices. Rows with no valid slot return zeros. With `scratch`, the
    gathered rows live in its buffers (see scratch.py).
    """
    batch, num_q_heads, rows, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    num_select_heads, slots = indices.shape[1], indices.shape[-1]
    if num_select_heads % num_kv_heads:
        return _sparse_attention_per_query_head(query, keys, values, indices, slot_valid, scaling)
    # Query heads viewed as [B, H_kv, S, G, ...] (S selection heads per KV head, G query heads per
    # selection): only the selected rows are gathered, once per selection head, and never repeated.
    per_kv = num_select_heads // num_kv_heads
    per_select = num_q_heads // num_select_heads
    index = indices.reshape(batch, num_kv_heads, per_kv * rows * slots)
    picked_shape = (*index.shape, head_dim)
    picked_keys = take_rows(keys, index, scratch_or_new(scratch, "picked_keys", picked_shape, keys.dtype, keys.device))
    picked_keys = picked_keys.float().view(batch, num_kv_heads, per_kv, rows, slots, head_dim)
    queries = query.float().view(batch, num_kv_heads, per_kv, per_select, rows, head_dim).transpose(3, 4)
    logits = torch.matmul(queries, picked_keys.transpose(-1, -2)) * scaling  # [B, H_kv, S, L, G, K]
    keep = slot_valid.expand(batch, -1, rows, slots)
    keep = (
        keep.reshape(batch, num_kv_heads, per_kv, rows, 1, slots)
        if keep.shape[1] > 1
        else keep.reshape(batch, 1, 1, rows, 1, slots)
    )
    logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = weighted_rows(values, index, weights, scratch)  # [B, H_kv, S, L, G, d]
    return out.transpose(3, 4).reshape(batch, num_q_heads, rows, head_dim).to(query.dtype)


def weighted_rows(
    values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, scratch: Optional[Scratch] = None
) -> torch.Tensor:
    """Sum of rows `index` of `values` weighted by `weights`.

    Shapes: [B, H, N, d], [B, H, S*L*K], [B, H, S, L, G, K] -> [B, H, S, L, G, d].

    fp32 values go through embedding_bag, which sums the rows as it reads them: on the CPU about
    seven times faster than gathering them first and multiplying (measured at 32K context, batch 4).
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
    picked = take_rows(
        values, index, scratch_or_new(scratch, "picked_values", (*index.shape, head_dim), values.dtype, values.device)
    )
    return torch.matmul(weights, picked.float().view(*outer, slots, head_dim))


def _sparse_attention_per_query_head(query, keys, values, indices, slot_valid, scaling) -> torch.Tensor:
    # Plain form for selection heads that span several KV heads (fewer selection heads than KV heads).
    batch, num_q_heads, rows, head_dim = query.shape
    slots = indices.shape[-1]
    index = _per_query_head(indices, num_q_heads).reshape(batch, num_q_heads, rows * slots, 1)
    index = index.expand(-1, -1, -1, head_dim)
    picked_keys = torch.gather(_per_query_head(keys, num_q_heads), 2, index).view(
        batch, num_q_heads, rows, slots, head_dim
    )
    picked_values = torch.gather(_per_query_head(values, num_q_heads), 2, index).view(
        batch, num_q_heads, rows, slots, head_dim
    )
    logits = torch.einsum("bhld,bhlkd->bhlk", query.float(), picked_keys.float()) * scaling
    keep = _per_query_head(slot_valid.expand(batch, -1, -1, -1), num_q_heads) if slot_valid.shape[1] > 1 else slot_valid
    logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhlk,bhlkd->bhld", weights, picked_values.float())
    return out.to(query.dtype)


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


if triton is not None:

    @triton.jit
    def _decode_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        index_ptr,
        keep_ptr,
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
        HEAD_DIM: tl.constexpr,
        DENSE: tl.constexpr,
        HAS_KEEP: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program: the query heads that share one selection (a whole KV group for selection="group"),
        # one query row, one split of the selected slots. Partial results are unnormalised.
        split = tl.program_id(0)
        unit = tl.program_id(1)
        batch = tl.program_id(2) // num_rows
        row = tl.program_id(2) % num_rows
        num_splits = tl.num_programs(0)
        heads = unit * HEADS_PER_PROGRAM + tl.arange(0, BLOCK_H)
        head_ok = tl.arange(0, BLOCK_H) < HEADS_PER_PROGRAM
        kv_head = (unit * HEADS_PER_PROGRAM) // QUERY_PER_KV
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q_tile = q_ptr + batch * stride_qb + heads[:, None] * stride_qh + row * stride_ql + dims[None, :] * stride_qd
        queries = tl.load(q_tile, mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        running_max = tl.full((BLOCK_H,), -float("inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
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
            row_ok = slot_ok[:, None] & dim_ok[None, :]
            k_rows = (
                k_ptr
                + batch * stride_kb
                + kv_head * stride_kh
                + tokens[:, None] * stride_kt
                + dims[None, :] * stride_kd
            )
            keys = tl.load(k_rows, mask=row_ok, other=0.0).to(tl.float32)
            logits = tl.dot(queries, tl.trans(keys), input_precision="ieee") * scaling
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
                + dims[None, :] * stride_vd
            )
            values = tl.load(v_rows, mask=row_ok, other=0.0).to(tl.float32)
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            acc = acc * rescale[:, None] + tl.dot(probs, values, input_precision="ieee")
            running_max = new_max
        if SINGLE_SPLIT:  # one split: normalise here and skip the merge launch
            merged = tl.where(running_sum[:, None] > 0, acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None], 0.0)
            out = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + row * stride_ol + dims[None, :] * stride_od
            tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
        else:
            # Partials are contiguous [B, H_q, L, splits(, d)].
            part = ((batch * (tl.num_programs(1) * HEADS_PER_PROGRAM) + heads) * num_rows + row) * num_splits + split
            tl.store(part_max_ptr + part, running_max, mask=head_ok)
            tl.store(part_sum_ptr + part, running_sum, mask=head_ok)
            tl.store(
                part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None] & dim_ok[None, :]
            )

    @triton.jit
    def _decode_merge_kernel(
        part_out_ptr,
        part_max_ptr,
        part_sum_ptr,
        out_ptr,
        num_splits,
        num_q_heads,
        num_rows,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_od,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch, query head, row): merge the splits' softmax pieces.
        flat = tl.program_id(0)
        row = flat % num_rows
        head = (flat // num_rows) % num_q_heads
        batch = flat // (num_rows * num_q_heads)
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        maxima = tl.load(part_max_ptr + flat * num_splits + splits, mask=split_ok, other=-float("inf"))
        sums = tl.load(part_sum_ptr + flat * num_splits + splits, mask=split_ok, other=0.0)
        overall = tl.max(maxima, axis=0)
        weights = tl.exp(maxima - tl.where(overall == -float("inf"), 0.0, overall))
        total = tl.sum(weights * sums, axis=0)
        parts = tl.load(
            part_out_ptr + (flat * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
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
) -> torch.Tensor:
    """Split-K flash decoding over `indices` [B, H_select, L, K] (None: every cached token) -> [B, H_q, L, d].

    keep: bool, broadcastable to [B, H_select, L, K] (or [B, 1, L, T] when dense), or None for all.
    """
    if triton is None:
        raise ValueError("the Triton attention kernels need triton installed; use backend='torch'")
    batch, num_q_heads, rows, head_dim = query.shape
    num_kv_heads, num_tokens = keys.shape[1], keys.shape[2]
    if keys.shape != values.shape or keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [B={batch}, H_kv, T, d={head_dim}]"
        )
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
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {query.dtype} of shape {tuple(query.shape)}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
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
        part_out = torch.empty(*part_shape, head_dim, dtype=torch.float32, device=query.device)
    _decode_partial_kernel[(splits, units, batch * rows)](
        query,
        keys,
        values,
        index_arg,
        keep_arg,
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
        HEAD_DIM=head_dim,
        DENSE=indices is None,
        HAS_KEEP=keep is not None,
        SINGLE_SPLIT=splits == 1,
        BLOCK_H=max(16, triton.next_power_of_2(heads_per_program)),
        BLOCK_K=block_slots,
        BLOCK_D=block_d,
    )
    if splits == 1:
        return out
    _decode_merge_kernel[(batch * num_q_heads * rows,)](
        part_out,
        part_max,
        part_sum,
        out,
        splits,
        num_q_heads,
        rows,
        *out.stride(),
        HEAD_DIM=head_dim,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_D=block_d,
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
) -> torch.Tensor:
    """Triton sparse attention: same result as `sparse_attention_reference` ([B, H_q, L, d])."""
    return flash_decode_triton(query, keys, values, scaling, indices, slot_valid, out=out, num_splits=num_splits)


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

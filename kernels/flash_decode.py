"""Flash-decoding in Triton: exact decode attention over selected (or all) cached tokens.

The K selected slots of each row are split across programs (split-K); each program attends all the
query heads that share one selection, so every selected K/V row is read once per selection head, and
a second kernel merges the splits. `sparse_attention_triton` (sparse_attention.py) and
`dense_attention_triton` (dense_attention.py, where the "selection" is every cached token) both run
`flash_decode_triton`. Shapes, learned sinks and softcapping are those of sparse_attention.py, whose
torch reference these kernels equal (tests/kernels/test_sparse_attention.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention_math import check_attention_inputs

try:  # importable where triton is missing (e.g. macOS); the kernels then do not exist
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


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

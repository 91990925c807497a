"""The native CPU kernels (cpu_decode.c) as torch custom ops, and the library calls they share with eager mode.

`torch.compile` sees each kernel as one op (`doublesparse::label_scores_int4`, `::select_tokens`,
`::sparse_attention`, and `::fused_decode`, the three in one) with a fake implementation that gives
its output's shape, so a compiled decode step neither traces into the loader (native.py) nor breaks
its graph. The ops are functional, returning fresh tensors: under compile Inductor owns the memory,
and a mutated `out` argument would only add a copy. Eager mode calls the `*_into` functions directly,
into the decode step's scratch buffers (see scratch.py): the dispatcher costs 8-12 us a call here,
one call per layer per step with the fused op (three without). Both paths run the same code, so
compiled and eager results are equal.

The `*_into` functions check what the C code relies on for memory safety (shapes, dtypes, limits);
the `*_cpu` wrappers in the kernel modules check the rest and say what to use instead. Indices
passed to sparse attention must lie in [0, T), as selection makes them: the kernel does not check.
"""

from __future__ import annotations

import torch

from . import native

ROW_KINDS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 17}  # cpu_decode.c's ROWS_* values


def _on_cpu(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if not tensor.is_cpu:
            raise ValueError(f"the native CPU kernels take CPU tensors only, got one on {tensor.device}")


def label_scores_into(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
) -> None:
    """Native scores of 4-bit labels into `out` (fp32 [B, H_select, L, T], contiguous); queries [B, H_q, L, r]."""
    lib = native.require_library()
    batch, num_q_heads, rows, num_channels = queries.shape
    num_label_heads, num_tokens = codes.shape[1], codes.shape[2]
    num_select_heads = out.shape[1]
    _on_cpu(queries, codes, scale, offset, out)
    if not (codes.dtype == torch.uint8 and codes.dim() == 4):
        raise ValueError(f"codes must be uint8 [B, H_label, T, r/2], got {codes.dtype} {tuple(codes.shape)}")
    if not (
        codes.shape == (batch, num_label_heads, num_tokens, num_channels // 2)
        and num_channels % 2 == 0
        and scale.shape == offset.shape == (batch, num_label_heads, num_tokens)
        and num_q_heads % num_label_heads == 0
        and num_q_heads % num_select_heads == 0
    ):
        raise ValueError(
            f"inconsistent label score shapes: queries {tuple(queries.shape)}, codes {tuple(codes.shape)}, "
            f"scale {tuple(scale.shape)}, offset {tuple(offset.shape)}, out {tuple(out.shape)}"
        )
    shape = (batch, num_select_heads, rows, num_tokens)
    if not (out.shape == shape and out.dtype == torch.float32 and out.is_contiguous()):
        raise ValueError(f"out must be contiguous float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return
    queries = queries.float().contiguous()
    if codes.stride(3) != 1:
        codes = codes.contiguous()
    halves = scale.dtype == offset.dtype == torch.float16
    if not halves or scale.stride() != offset.stride() or scale.stride(2) != 1:
        scale, offset = scale.half().contiguous(), offset.half().contiguous()
    lib.doublesparse_label_scores(
        queries.data_ptr(),
        codes.data_ptr(),
        *codes.stride()[:3],
        scale.data_ptr(),
        offset.data_ptr(),
        *scale.stride()[:2],
        out.data_ptr(),
        batch,
        num_q_heads,
        num_label_heads,
        num_select_heads,
        rows,
        num_tokens,
        num_channels,
        float(scaling),
        torch.get_num_threads(),
    )


def selection_threads(scores: torch.Tensor) -> int:
    """Threads the native selection of `scores` [B, H, L, T] splits its rows over (one workspace row each)."""
    batch, heads, rows, _ = scores.shape
    return max(1, min(torch.get_num_threads(), batch * heads * rows))


def select_tokens_into(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    indices: torch.Tensor,
    workspace: torch.Tensor,
) -> None:
    """Native selection into `indices` (int64 [B, H, L, K], contiguous); workspace int32 [selection_threads, 2, T]."""
    lib = native.require_library()
    batch, heads, rows, num_tokens = scores.shape
    limits = native.native_limits()
    _on_cpu(scores, valid, budgets, indices, workspace)
    if num_tokens > limits.max_select_tokens:
        raise ValueError(f"native selection indexes at most {limits.max_select_tokens} tokens, got {num_tokens}")
    if not (valid.shape == (batch, rows, num_tokens) and budgets.shape == (batch, rows)):
        raise ValueError(
            f"valid must be [B, L, T] = {(batch, rows, num_tokens)} and budgets [B, L], "
            f"got {tuple(valid.shape)} and {tuple(budgets.shape)}"
        )
    if not (indices.shape[:3] == scores.shape[:3] and indices.dtype == torch.int64 and indices.is_contiguous()):
        raise ValueError(
            f"indices must be contiguous int64 [{batch}, {heads}, {rows}, K], "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    threads = selection_threads(scores)
    if not (
        workspace.dtype == torch.int32 and workspace.is_contiguous() and workspace.numel() >= threads * 2 * num_tokens
    ):
        raise ValueError(f"workspace must be contiguous int32 of at least {threads * 2 * num_tokens} elements")
    if indices.numel() == 0:
        return
    scores = scores.float().contiguous()
    valid = valid.bool()
    budgets = budgets.to(torch.int64).contiguous()
    lib.doublesparse_select_tokens(
        scores.data_ptr(),
        valid.data_ptr(),
        *valid.stride(),
        budgets.data_ptr(),
        indices.data_ptr(),
        workspace.data_ptr(),
        batch,
        heads,
        rows,
        num_tokens,
        indices.shape[3],
        sink_tokens,
        recent_tokens,
        threads,
    )


def sparse_attention_limits_hold(num_q_heads: int, num_select_heads: int, head_dim: int) -> bool:
    """Whether the library's fixed buffers hold a selection head of these query heads and head_dim."""
    limits = native.native_limits()
    if limits is None:
        return False
    per_select = num_q_heads // num_select_heads
    return (
        per_select <= limits.max_group_heads
        and per_select * head_dim <= limits.max_group_accumulator
        and head_dim <= limits.max_head_dim
    )


def sparse_attention_into(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    weights: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Native sparse attention into `out` (fp32 [B, H_q, L, d], contiguous); weights fp32 [B, H_select, L, G, K]."""
    lib = native.require_library()
    batch, num_q_heads, rows, head_dim = query.shape
    num_kv_heads, num_select_heads, slots = keys.shape[1], indices.shape[1], indices.shape[-1]
    _on_cpu(query, keys, values, indices, slot_valid, weights, out)
    if not (
        keys.dtype == values.dtype
        and keys.dtype in ROW_KINDS
        and keys.shape == values.shape
        and keys.dim() == 4
        and keys.shape[0] == batch
        and keys.shape[3] == head_dim
    ):
        raise ValueError(
            f"keys and values must be fp32/fp16/bf16 [B, H_kv, T, d] alike, got {keys.dtype} {tuple(keys.shape)} "
            f"and {values.dtype} {tuple(values.shape)} for query {tuple(query.shape)}"
        )
    if not (
        indices.shape[:3] == (batch, num_select_heads, rows)
        and num_select_heads % num_kv_heads == 0
        and num_q_heads % num_select_heads == 0
    ):
        raise ValueError(
            f"indices {tuple(indices.shape)} must be [B, H_select, L, K], H_select a multiple of H_kv dividing H_q"
        )
    per_select = num_q_heads // num_select_heads
    if not sparse_attention_limits_hold(num_q_heads, num_select_heads, head_dim):
        raise ValueError(
            f"{per_select} query heads per selection of head_dim {head_dim} exceed the library's "
            f"{native.native_limits()}"
        )
    if not (out.shape == query.shape and out.dtype == torch.float32 and out.is_contiguous()):
        raise ValueError(f"out must be contiguous float32 {tuple(query.shape)}, got {out.dtype} {tuple(out.shape)}")
    weights_needed = batch * num_q_heads * rows * slots
    if not (weights.dtype == torch.float32 and weights.is_contiguous() and weights.numel() >= weights_needed):
        raise ValueError(
            f"weights must be contiguous float32 [B, H_select, L, {per_select}, K] ({weights_needed} elements), "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    if out.numel() == 0:
        return
    if keys.stride() != values.stride() or keys.stride(3) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    queries = query.float().contiguous()
    index = indices.to(torch.int64).contiguous()
    keep = slot_valid.to(torch.bool).expand(batch, num_select_heads, rows, slots)
    lib.doublesparse_sparse_attention(
        queries.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        *keys.stride()[:3],
        index.data_ptr(),
        keep.data_ptr(),
        *keep.stride(),
        weights.data_ptr(),
        out.data_ptr(),
        batch,
        num_q_heads,
        num_kv_heads,
        num_select_heads,
        rows,
        slots,
        head_dim,
        ROW_KINDS[keys.dtype],
        float(scaling),
        torch.get_num_threads(),
    )


def fused_decode_workspace_bytes(tokens: int, max_budget: int, group: int, threads: int) -> int:
    """Bytes of the fused decode step's workspace for `threads` threads (the library's own formula)."""
    return threads * native.require_library().doublesparse_fused_workspace_bytes(tokens, max_budget, group)


def read_rows(buffer: torch.Tensor, rows: torch.Tensor, row_bytes: int) -> int:
    """Read the first `row_bytes` of rows `rows` of a uint8 [N, stride] buffer as sparse attention reads K/V rows.

    The access pattern alone, for `bench decode`'s random-row ceiling; returns the xor of the 8-byte words read.
    """
    lib = native.require_library()
    _on_cpu(buffer, rows)
    if not (buffer.dtype == torch.uint8 and buffer.dim() == 2 and buffer.is_contiguous()):
        raise ValueError(
            f"buffer must be a contiguous uint8 [N, stride] tensor, got {buffer.dtype} {tuple(buffer.shape)}"
        )
    if not (0 < row_bytes <= buffer.shape[1] and row_bytes % 8 == 0):
        raise ValueError(f"row_bytes must be a positive multiple of 8 up to {buffer.shape[1]}, got {row_bytes}")
    if not (rows.dtype == torch.int64 and rows.dim() == 1):
        raise ValueError(f"rows must be int64 [n], got {rows.dtype} {tuple(rows.shape)}")
    rows = rows.contiguous()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= buffer.shape[0]):
        raise ValueError(f"rows must lie in [0, {buffer.shape[0]})")
    return int(
        lib.doublesparse_read_rows(
            buffer.data_ptr(), row_bytes, buffer.shape[1], rows.data_ptr(), rows.numel(), torch.get_num_threads()
        )
    )


def fused_decode_into(
    query: torch.Tensor,
    channels: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    num_select_heads: int,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scaling: float,
    out: torch.Tensor,
    workspace: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> None:
    """Native fused decode step (4-bit label scores, selection, sparse attention) into `out`.

    out: fp32 [B, H_q, L, d] at any strides with d contiguous (a [B, L, H_q, d] buffer seen transposed);
    workspace: uint8, `fused_decode_workspace_bytes` for torch's thread count; `indices`, if given,
    receives the selection (int64 [B, H_select, L, max_budget], contiguous) as select_tokens makes it.
    """
    lib = native.require_library()
    limits = native.native_limits()
    batch, num_q_heads, rows, head_dim = query.shape
    num_label_heads, num_channels = channels.shape if channels.dim() == 2 else (0, 0)
    num_kv_heads, num_tokens = keys.shape[1], keys.shape[2]
    _on_cpu(query, channels, codes, scale, offset, keys, values, valid, budgets, out, workspace)
    if not (
        channels.dtype == torch.int64
        and channels.dim() == 2
        and 0 < num_label_heads
        and num_channels % 2 == 0
        and 0 < num_channels <= limits.max_head_dim
        and codes.dtype == torch.uint8
        and codes.shape == (batch, num_label_heads, num_tokens, num_channels // 2)
        and scale.shape == offset.shape == (batch, num_label_heads, num_tokens)
    ):
        raise ValueError(
            f"inconsistent label shapes: channels {channels.dtype} {tuple(channels.shape)}, codes {codes.dtype} "
            f"{tuple(codes.shape)}, scale {tuple(scale.shape)}, offset {tuple(offset.shape)} for {num_tokens} tokens"
        )
    if not (
        keys.dtype == values.dtype
        and keys.dtype in ROW_KINDS
        and keys.dim() == 4
        and keys.shape == values.shape
        and keys.shape[0] == batch
        and keys.shape[3] == head_dim
    ):
        raise ValueError(
            f"keys and values must be fp32/fp16/bf16 [B, H_kv, T, d] alike, got {keys.dtype} {tuple(keys.shape)} "
            f"and {values.dtype} {tuple(values.shape)} for query {tuple(query.shape)}"
        )
    if not (
        num_q_heads % num_label_heads == 0
        and num_q_heads % num_select_heads == 0
        and num_select_heads % num_kv_heads == 0
        and sparse_attention_limits_hold(num_q_heads, num_select_heads, head_dim)
    ):
        raise ValueError(
            f"{num_q_heads} query heads, {num_label_heads} label heads, {num_select_heads} selection heads and "
            f"{num_kv_heads} KV heads do not nest, or exceed the library's {limits}"
        )
    if num_tokens > limits.max_select_tokens:
        raise ValueError(f"native selection indexes at most {limits.max_select_tokens} tokens, got {num_tokens}")
    if not (valid.shape == (batch, rows, num_tokens) and budgets.shape == (batch, rows)):
        raise ValueError(
            f"valid must be [B, L, T] = {(batch, rows, num_tokens)} and budgets [B, L], "
            f"got {tuple(valid.shape)} and {tuple(budgets.shape)}"
        )
    if not (out.shape == query.shape and out.dtype == torch.float32 and out.stride(3) == 1):
        raise ValueError(
            f"out must be float32 {tuple(query.shape)} with contiguous rows, got {out.dtype} {tuple(out.shape)}"
        )
    threads = max(1, torch.get_num_threads())
    group = num_q_heads // num_select_heads
    needed = fused_decode_workspace_bytes(num_tokens, max_budget, group, threads)
    if not (workspace.dtype == torch.uint8 and workspace.is_contiguous() and workspace.numel() >= needed):
        raise ValueError(f"workspace must be contiguous uint8 of at least {needed} bytes")
    index_shape = (batch, num_select_heads, rows, max_budget)
    if indices is not None and not (
        indices.shape == index_shape and indices.dtype == torch.int64 and indices.is_contiguous()
    ):
        raise ValueError(f"indices must be contiguous int64 {index_shape}, got {indices.dtype} {tuple(indices.shape)}")
    if out.numel() == 0:
        return
    queries = query.float().contiguous()
    channels = channels.contiguous()
    if codes.stride(3) != 1:
        codes = codes.contiguous()
    if not (scale.dtype == offset.dtype == torch.float16) or scale.stride() != offset.stride() or scale.stride(2) != 1:
        scale, offset = scale.half().contiguous(), offset.half().contiguous()
    if keys.stride() != values.stride() or keys.stride(3) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    valid = valid.bool()
    budgets = budgets.to(torch.int64).contiguous()
    status = lib.doublesparse_fused_decode(
        queries.data_ptr(),
        channels.data_ptr(),
        codes.data_ptr(),
        *codes.stride()[:3],
        scale.data_ptr(),
        offset.data_ptr(),
        *scale.stride()[:2],
        keys.data_ptr(),
        values.data_ptr(),
        *keys.stride()[:3],
        valid.data_ptr(),
        *valid.stride(),
        budgets.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        None if indices is None else indices.data_ptr(),
        workspace.data_ptr(),
        batch,
        num_q_heads,
        num_label_heads,
        num_kv_heads,
        num_select_heads,
        rows,
        num_tokens,
        num_channels,
        max_budget,
        head_dim,
        sink_tokens,
        recent_tokens,
        ROW_KINDS[keys.dtype],
        float(scaling),
        threads,
    )
    if status:  # the library checks the channels (it indexes the query rows with them) before any work
        raise ValueError(f"label channels must lie in [0, {head_dim}), got {channels.min()}..{channels.max()}")


@torch.library.custom_op("doublesparse::label_scores_int4", mutates_args=(), device_types="cpu")
def label_scores_int4(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    num_select_heads: int,
    scaling: float,
) -> torch.Tensor:
    """fp32 scores [B, H_select, L, T] of 4-bit labels (codes [B, H_label, T, r/2], scale, offset) for queries."""
    out = torch.empty(_scores_shape(queries, codes, num_select_heads), dtype=torch.float32)
    label_scores_into(queries, codes, scale, offset, scaling, out)
    return out


@label_scores_int4.register_fake
def _(queries, codes, scale, offset, num_select_heads, scaling):
    return queries.new_empty(_scores_shape(queries, codes, num_select_heads), dtype=torch.float32)


def _scores_shape(queries: torch.Tensor, codes: torch.Tensor, num_select_heads: int) -> tuple[int, ...]:
    return (queries.shape[0], num_select_heads, queries.shape[2], codes.shape[2])


@torch.library.custom_op("doublesparse::select_tokens", mutates_args=(), device_types="cpu")
def select_tokens_op(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
) -> torch.Tensor:
    """int64 indices [B, H, L, max_budget] of each row's selection (see select_tokens_cpu)."""
    indices = torch.empty((*scores.shape[:3], max_budget), dtype=torch.int64)
    workspace = torch.empty((selection_threads(scores), 2, scores.shape[3]), dtype=torch.int32)
    select_tokens_into(scores, valid, budgets, sink_tokens, recent_tokens, indices, workspace)
    return indices


@select_tokens_op.register_fake
def _(scores, valid, budgets, sink_tokens, recent_tokens, max_budget):
    return scores.new_empty((*scores.shape[:3], max_budget), dtype=torch.int64)


@torch.library.custom_op("doublesparse::sparse_attention", mutates_args=(), device_types="cpu")
def sparse_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """fp32 attention [B, H_q, L, d] of each query row over its valid selected slots (see sparse_attention_cpu)."""
    batch, num_q_heads, rows, _ = query.shape
    num_select_heads, slots = indices.shape[1], indices.shape[-1]
    per_select = num_q_heads // max(num_select_heads, 1)
    weights = torch.empty((batch, num_select_heads, rows, per_select, slots), dtype=torch.float32)
    out = torch.empty(query.shape, dtype=torch.float32)
    sparse_attention_into(query, keys, values, indices, slot_valid, scaling, weights, out)
    return out


@sparse_attention_op.register_fake
def _(query, keys, values, indices, slot_valid, scaling):
    return query.new_empty(query.shape, dtype=torch.float32)


@torch.library.custom_op("doublesparse::fused_decode", mutates_args=(), device_types="cpu")
def fused_decode_op(
    query: torch.Tensor,
    channels: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    num_select_heads: int,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scaling: float,
) -> torch.Tensor:
    """fp32 attention [B, L, H_q, d] (the attention function's layout) of the fused step (see fused_decode_cpu)."""
    batch, num_q_heads, rows, head_dim = query.shape
    out = torch.empty((batch, rows, num_q_heads, head_dim), dtype=torch.float32)
    threads = max(1, torch.get_num_threads())
    group = num_q_heads // max(num_select_heads, 1)
    workspace = torch.empty(fused_decode_workspace_bytes(keys.shape[2], max_budget, group, threads), dtype=torch.uint8)
    fused_decode_into(
        query,
        channels,
        codes,
        scale,
        offset,
        keys,
        values,
        valid,
        budgets,
        num_select_heads,
        sink_tokens,
        recent_tokens,
        max_budget,
        scaling,
        out.transpose(1, 2),
        workspace,
    )
    return out


@fused_decode_op.register_fake
def _(
    query,
    channels,
    codes,
    scale,
    offset,
    keys,
    values,
    valid,
    budgets,
    num_select_heads,
    sink_tokens,
    recent_tokens,
    max_budget,
    scaling,
):
    batch, num_q_heads, rows, head_dim = query.shape
    return query.new_empty((batch, rows, num_q_heads, head_dim), dtype=torch.float32)

"""The fused decode step: label scores, selection and sparse attention of one-row queries in one op.

Its reference is the composition of the three ops' references (label_scores.py, selection.py,
sparse_attention.py): gather the query's label channels, score every cached token, select each row's
budget of tokens, attend exactly over them. The native CPU kernel (cpu_fused_decode.c) runs the three
native kernels' own arithmetic item by item (one batch row and selection head at a time), so its
output equals the unfused native ops' bit for bit; against the references it differs by the
rounding of the attention (fp32 accumulation in another order: `output_tolerance`), and it selects
the same tokens wherever the scores it ranks equal the reference's (4-bit label scores are exact
for integer-valued problems, see tests/kernels/test_fused_decode.py).

What fusing buys on a CPU: the scores of a row (4 bytes per cached token) stay in the thread's cache
between scoring and selection instead of making a round trip through memory, the query's channels
are read in place, the output is written in the attention function's layout, and a layer's step is
one parallel region instead of three, with items handed to whichever thread is free.
"""

from __future__ import annotations

from typing import Optional

import torch

from .label_append import Labels
from .label_scores import gather_query_channels, label_scores_reference
from .scratch import Scratch, scratch_or_new
from .selection import select_tokens_reference
from .sparse_attention import sparse_attention_reference


@torch.no_grad()
def fused_decode_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    channels: torch.Tensor,
    labels: Labels,
    bits: int,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scaling: float,
    num_select_heads: int,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Torch reference: [B, H_q, L, d] attention of each row over its selection, in the query dtype.

    query [B, H_q, L, d]; keys/values [B, H_kv, T, d]; channels [H_label, r] and labels of every cached
    key; valid [B, L, T]; budgets [B, L]; `max_budget` slots per row (see select_tokens_reference).
    """
    scores = label_scores_reference(
        gather_query_channels(query, channels), labels, bits, scaling, num_select_heads, scratch
    )
    indices, slot_valid = select_tokens_reference(
        scores, valid, budgets, sink_tokens, recent_tokens, max_budget, scratch
    )
    return sparse_attention_reference(query, keys, values, indices, slot_valid, scaling, scratch)


def fused_decode_cpu_supports(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    channels: torch.Tensor,
    labels: Labels,
    bits: int,
    num_select_heads: int,
) -> bool:
    """Whether `fused_decode_cpu` takes these inputs: 4-bit labels and what native sparse attention takes."""
    from . import native, native_ops

    limits = native.native_limits()
    if limits is None or bits != 4 or labels.codes.dtype != torch.uint8 or channels.dim() != 2:
        return False
    num_q_heads, head_dim = query.shape[1], query.shape[3]
    num_kv_heads, num_tokens = keys.shape[1], keys.shape[2]
    return (
        query.device.type == keys.device.type == values.device.type == labels.codes.device.type == "cpu"
        and values.shape == keys.shape
        and keys.dtype == values.dtype
        and keys.dtype in native_ops.ROW_KINDS
        and keys.stride() == values.stride()
        and keys.stride(3) == 1
        and num_q_heads % channels.shape[0] == 0
        and num_q_heads % num_select_heads == 0
        and num_select_heads % num_kv_heads == 0
        and labels.codes.shape[3] * 2 == channels.shape[1] <= limits.max_head_dim
        and num_tokens <= limits.max_select_tokens
        and native_ops.sparse_attention_limits_hold(num_q_heads, num_select_heads, head_dim)
    )


def fused_decode_cpu(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    channels: torch.Tensor,
    labels: Labels,
    bits: int,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scaling: float,
    num_select_heads: int,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Native fused step (cpu_fused_decode.c): `fused_decode_reference`'s result, [B, H_q, L, d] in the query dtype.

    The result is a transposed view of a [B, L, H_q, d] tensor: `.transpose(1, 2).contiguous()`, what
    the attention function returns, is then no copy.
    """
    from . import native, native_ops  # native_ops registers the ops; the library is built at first use

    native.require_native()
    if not fused_decode_cpu_supports(query, keys, values, channels, labels, bits, num_select_heads):
        raise ValueError(
            "the native fused decode step takes 4-bit labels and CPU K/V that native sparse attention takes "
            "(see sparse_attention_cpu); use the separate ops (dispatch.label_scores, select_tokens, sparse_attention)"
        )
    batch, num_q_heads, rows, head_dim = query.shape
    if torch.compiler.is_compiling():  # one graph node; eager skips the dispatcher (see native_ops.py)
        out = torch.ops.doublesparse.fused_decode(
            query,
            channels,
            labels.codes,
            labels.scale,
            labels.offset,
            keys,
            values,
            valid,
            budgets,
            num_select_heads,
            sink_tokens,
            recent_tokens,
            max_budget,
            float(scaling),
        )
    else:
        # A fresh output (it is the layer's attention output, kept by the model); the workspace is reused.
        out = torch.empty((batch, rows, num_q_heads, head_dim), dtype=torch.float32)
        threads = max(1, torch.get_num_threads())
        group = num_q_heads // num_select_heads
        size = native_ops.fused_decode_workspace_bytes(keys.shape[2], max_budget, group, threads)
        workspace = scratch_or_new(scratch, "fused_workspace", (size,), torch.uint8, query.device)
        native_ops.fused_decode_into(
            query,
            channels,
            labels.codes,
            labels.scale,
            labels.offset,
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
    return out.transpose(1, 2).to(query.dtype)

"""The offload attention step: the selected rows come from host memory, the recent window from the device.

A one-row step selects exactly (with its own query) or takes the rows its prefetch already copied
(offload/prefetch.py), puts the device window in front of them, and attends over that buffer. A
multi-row call after a past (chunked prefill, assisted decoding) selects exactly per row and copies
synchronously; so do the rows after the prompt in a call with no past (assisted decoding's first
round). A prefill attends densely over the prompt's own K/V, which the layer computed on the device
anyway. With gradients enabled, the attention over the selection runs the torch reference: it is
differentiable in the query (the offloaded K/V are stored detached).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.dispatch import label_scores, select_tokens, sparse_attention
from ..kernels.label_projection import query_labels
from ..kernels.sparse_attention import sparse_attention_reference
from ..label_attention import needs_grad
from ..plan import LayerPlan
from ..policy import row_budgets, static_max_budget, valid_keys
from ..step import AttentionCall
from .host_store import gather_rows
from .selection import step_selection

if TYPE_CHECKING:
    from .cache import OffloadLayer


def attend_offloaded(layer: "OffloadLayer", call: AttentionCall, plan: LayerPlan) -> tuple[torch.Tensor, None]:
    """Offload-mode attention of one layer: gather the selected rows from host memory, attend over them."""
    query = call.query
    batch, _, rows, head_dim = query.shape
    length = layer.length
    backend = plan.backend_on(query.device)
    channels = plan.channels_on(query.device)
    if rows == length:
        drafts = rows - (call.prompt_rows or rows)
        if drafts <= 0:
            return call.dense()
        # Assisted decoding's first round: the prompt attends densely, the draft rows like decode steps.
        dense, _ = call.dense()
        tail = _multi_row_attention(layer, call.last_rows(drafts), plan, channels, backend)
        return torch.cat([dense[:, : rows - drafts], tail], dim=1), None
    if rows > 1:
        return _multi_row_attention(layer, call, plan, channels, backend), None
    differentiable = needs_grad(query)
    with torch.no_grad():  # selection and copies: nothing to differentiate
        out = _one_row_attention(layer, call, plan, channels, backend, differentiable)
    return out.transpose(1, 2).contiguous(), None


def _one_row_attention(
    layer: "OffloadLayer",
    call: AttentionCall,
    plan: LayerPlan,
    channels: torch.Tensor,
    backend: str,
    differentiable: bool,
) -> torch.Tensor:
    query = call.query
    batch, _, _, head_dim = query.shape
    length = layer.length
    config = plan.config
    scaling = call.scaling

    valid = valid_keys(call.attention_mask, batch, 1, length, query.device)
    window = layer.window_keys.shape[2]
    prefetcher = layer.owner.prefetcher
    pending = prefetcher.take(plan.layer_idx, length) if prefetcher is not None else None
    predicted = pending is not None and pending.keys is not None and prefetcher.uses_prediction(plan.layer_idx)
    exact = None
    if not predicted or prefetcher.measures(plan.layer_idx):
        q_labels = query_labels(query, channels)
        scores = label_scores(q_labels, layer.labels, config.label_bits, scaling, plan.num_select_heads, backend)
        exact = step_selection(scores, valid, config, length, window)
        if pending is not None and prefetcher.measures(plan.layer_idx):
            prefetcher.record_recall(plan.layer_idx, pending.selection, exact, length)

    heads = layer.window_keys.shape[1]
    if predicted:
        selection, keys, values = pending.selection, pending.keys, pending.values
    else:
        selection = exact
        host_slots = selection.indices.shape[-1] * (selection.indices.shape[1] // heads)
        shape = (batch, heads, window + host_slots, head_dim)
        keys_store, values_store = layer.host_store()
        keys, values = layer.owner.buffers_for(query.device).sync_views(
            shape, layer.window_keys.dtype, query.device, value_dim=values_store.shape[3]
        )
        indices = selection.indices.reshape(batch, heads, -1)
        gather_rows(keys_store, indices, keys[:, :, window:], backend)
        gather_rows(values_store, indices, values[:, :, window:], backend)
    keys[:, :, :window].copy_(layer.window_keys)
    values[:, :, :window].copy_(layer.window_values)

    num_select, host_slots = selection.indices.shape[1], selection.indices.shape[-1]
    per_kv = num_select // heads
    # Buffer slot of each attended row: the window first (shared by a KV head's selection heads),
    # then each selection head's own host rows.
    device = query.device
    window_slots = torch.arange(window, device=device).expand(num_select, window)
    own_slots = (
        window
        + (torch.arange(num_select, device=device) % per_kv)[:, None] * host_slots
        + torch.arange(host_slots, device=device)
    )
    local = torch.cat([window_slots, own_slots], dim=1)[None, :, None, :].expand(batch, -1, 1, -1)
    slot_valid = torch.cat([selection.window_valid, selection.valid], dim=-1)
    extras = call.extras
    if differentiable:
        # The copy buffers are reused by the next step: autograd keeps copies of this step's rows.
        with torch.enable_grad():
            out = sparse_attention_reference(query, keys.clone(), values.clone(), local, slot_valid, scaling, **extras)
    else:
        out = sparse_attention(query, keys, values, local, slot_valid, scaling, backend, **extras)
    if pending is not None and prefetcher is not None:
        prefetcher.release(pending)
    return out


def _multi_row_attention(
    layer: "OffloadLayer", call: AttentionCall, plan: LayerPlan, channels: torch.Tensor, backend: str
) -> torch.Tensor:
    """Several new rows after a past (chunked prefill, assisted decoding): exact per-row selection, synchronous copy."""
    config, query = plan.config, call.query
    batch, _, rows, head_dim = query.shape
    length = layer.length
    valid = valid_keys(call.attention_mask, batch, rows, length, query.device)
    budgets = row_budgets(config, valid.sum(dim=-1))
    max_budget = static_max_budget(config, length)
    with torch.no_grad():  # selection and copies: nothing to differentiate
        q_labels = query_labels(query, channels)
        scores = label_scores(q_labels, layer.labels, config.label_bits, call.scaling, plan.num_select_heads, backend)
        indices, slot_valid = select_tokens(
            scores, valid, budgets, config.sink_tokens, config.recent_tokens, max_budget, backend
        )
        keys_store, values_store = layer.host_store()
        heads = keys_store.shape[2]
        flat = indices.reshape(batch, heads, -1)
        keys = torch.empty(batch, heads, flat.shape[2], head_dim, dtype=keys_store.dtype, device=query.device)
        values = keys.new_empty(batch, heads, flat.shape[2], values_store.shape[3])
        gather_rows(keys_store, flat, keys, backend)
        gather_rows(values_store, flat, values, backend)
    per_head = flat.shape[2] // (indices.shape[1] // heads)
    local = (
        torch.arange(per_head * (indices.shape[1] // heads), device=query.device).repeat(heads).view(indices.shape[1:])
    )
    out = sparse_attention_reference(
        query,
        keys,
        values,
        local[None].expand(batch, -1, -1, -1),
        slot_valid,
        call.scaling,
        **call.extras,
    )
    return out.transpose(1, 2).contiguous()

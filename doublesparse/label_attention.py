"""The Double Sparsity step over K/V held on the device: score labels, select top-k, attend exactly.

Prefill attends densely (unless `simulate`); a decode step scores every cached token from its label,
selects the top-k (plus sink and recent tokens) and attends exactly over the selection. Rows whose
budget covers their whole past attend densely. Growing and preallocated label caches run this step
(cache.py); without a label cache (no cache, `use_cache=False`) the labels are made from the keys
handed over.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels.dispatch import label_scores, make_labels, select_tokens, sparse_attention
from .kernels.label_append import Labels
from .kernels.label_projection import query_labels
from .kernels.scratch import Scratch
from .kernels.sparse_attention import masked_attention_reference, selection_mask
from .plan import LayerPlan
from .policy import row_budgets, static_max_budget, valid_keys
from .step import AttentionCall


def attend_over_labels(
    call: AttentionCall,
    plan: LayerPlan,
    labels: Optional[Labels] = None,
    filled: Optional[torch.Tensor] = None,
    scratch: Optional[Scratch] = None,
) -> tuple[torch.Tensor, None]:
    """One layer's attention over all its keys `call.key`: labels of every key (made here if None).

    `filled` (a 0-d tensor) is the fill of a preallocated cache whose buffers `call.key` are; its steps
    take a fixed number of slots from shapes alone and their temporaries from `scratch`.
    """
    query, key, value = call.query, call.key, call.value
    batch, _, rows, _ = query.shape
    length = key.shape[2]
    config = plan.config
    if rows > 1 and not config.simulate:
        # A prefill (no past) is dense. Static caches only know their fill on the device; reading it
        # here is fine because prefills are never captured in a graph.
        past = (int(filled) if filled is not None else length) - rows
        if past == 0:
            return call.dense()
    scaling = call.scaling
    backend = plan.backend_on(query.device)

    valid = valid_keys(call.attention_mask, batch, rows, length, query.device, filled)
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    if filled is None:
        if bool((budgets >= lengths).all()):
            return call.dense()
        max_budget = int(budgets.max())
    else:
        # Preallocated cache: a fixed number of slots from shapes alone, so nothing is read back.
        max_budget = static_max_budget(config, length)
        if max_budget >= length:
            return call.dense()

    channels = plan.channels_on(query.device)
    if labels is None or labels.codes.shape[2] != length:
        labels = make_labels(key, channels, config.label_bits, backend)
    scores = label_scores(
        query_labels(query, channels),
        labels,
        config.label_bits,
        scaling,
        plan.num_select_heads,
        backend,
        scratch,
    )
    indices, slot_valid = select_tokens(
        scores, valid, budgets, config.sink_tokens, config.recent_tokens, max_budget, backend, scratch
    )
    if rows == 1:
        out = sparse_attention(query, key, value, indices, slot_valid, scaling, backend, scratch)
    else:
        out = masked_attention_reference(query, key, value, selection_mask(indices, slot_valid, length), scaling)
    return out.transpose(1, 2).contiguous(), None

"""The Double Sparsity step over K/V held on the device: score labels, select top-k, attend exactly.

Prefill attends densely (unless `simulate`); a decode step scores every cached token from its label,
selects the top-k (plus sink and recent tokens) and attends exactly over the selection. Several rows
after a past (chunked prefill, assisted decoding's verification) each select like a decode step, and
so do the rows after the prompt in a call with no past (assisted decoding's first round, told by
`AttentionCall.prompt_rows`). Rows whose budget covers their whole past attend densely. Growing and
preallocated label caches run this step (cache.py); without a label cache (no cache, `use_cache=False`)
the labels are made from the keys handed over.

With gradients enabled the selection runs under `no_grad` (it is discrete) and the exact attention
over the selection runs the torch reference, which is differentiable in q, k and v.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels.dispatch import fused_decode, label_scores, make_labels, select_tokens, sparse_attention
from .kernels.label_append import Labels
from .kernels.label_projection import query_labels
from .kernels.scratch import Scratch
from .kernels.sparse_attention import masked_attention_reference, selection_mask, sparse_attention_reference
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
            drafts = rows - (call.prompt_rows or rows)
            if drafts <= 0:
                return call.dense()
            return _prompt_then_drafts(call, plan, labels, filled, scratch, drafts)
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
    recorded = needs_grad(query, key, value)  # asked before no_grad below, which would hide it
    with torch.no_grad():  # the selection is discrete: nothing to differentiate
        if labels is None or labels.codes.shape[2] != length:
            labels = make_labels(key, channels, config.label_bits, backend)
        # Sinks and softcapping change only the exact attention, which the fused op does not serve.
        if rows == 1 and not recorded and not call.extras:  # a decode step: scores, selection, attention in one op
            out = fused_decode(
                query,
                key,
                value,
                channels,
                labels,
                config.label_bits,
                valid,
                budgets,
                config.sink_tokens,
                config.recent_tokens,
                max_budget,
                scaling,
                plan.num_select_heads,
                backend,
                scratch,
            )
            return out.transpose(1, 2).contiguous(), None
        # Scores stay uncapped even where the model softcaps its logits: tanh is increasing, so capping
        # would not change which tokens rank highest (nor would the group's max, or a sink logit, which
        # only adds the same term to every key's denominator). The exact attention below caps and sinks.
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
    extras = call.extras
    if rows > 1:
        selected = selection_mask(indices, slot_valid, length)
        out = masked_attention_reference(query, key, value, selected, scaling, **extras)
    elif recorded:
        out = sparse_attention_reference(query, key, value, indices, slot_valid, scaling, **extras)
    else:
        out = sparse_attention(query, key, value, indices, slot_valid, scaling, backend, scratch, **extras)
    return out.transpose(1, 2).contiguous(), None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors (then the native and Triton kernels cannot serve it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _prompt_then_drafts(
    call: AttentionCall,
    plan: LayerPlan,
    labels: Optional[Labels],
    filled: Optional[torch.Tensor],
    scratch: Optional[Scratch],
    drafts: int,
) -> tuple[torch.Tensor, None]:
    # No past, but the newest `drafts` rows follow the prompt (assisted decoding's first round): the
    # prompt attends densely as a prefill does, each draft row selects among its past like a decode step.
    dense, _ = call.dense()
    tail, _ = attend_over_labels(call.last_rows(drafts, filled), plan, labels, filled, scratch)
    return torch.cat([dense[:, : call.rows - drafts], tail], dim=1), None

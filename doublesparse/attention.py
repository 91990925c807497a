"""The Double Sparsity attention function, registered with transformers' attention interface.

Prefill attends densely (unless `simulate`); a decode step scores every cached token from its label,
selects the top-k (plus sink and recent tokens) and attends exactly over the selection. Rows whose
budget covers their whole past, layers listed dense and sliding-window layers attend densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .config import SparsityConfig
from .kernels.dispatch import label_scores, make_labels, select_tokens, sparse_attention
from .kernels.label_append import Labels
from .kernels.label_scores import gather_query_channels
from .kernels.sparse_attention import masked_attention_reference, selection_mask

ATTENTION_NAME = "doublesparse"
PLAN_ATTRIBUTE = "_doublesparse_plan"
CACHE_KWARG = "doublesparse_cache"


@dataclass
class LayerPlan:
    """What one attention layer does: its label channels [H_label, r] and selection heads, or dense."""

    layer_idx: int
    config: SparsityConfig
    channels: Optional[torch.Tensor]
    num_select_heads: int
    dense: bool = False

    def channels_on(self, device: torch.device) -> torch.Tensor:
        """The label channels on `device` (moved once, then kept there)."""
        if self.channels.device != device:
            self.channels = self.channels.to(device)
        return self.channels


def valid_keys(
    attention_mask: Optional[torch.Tensor],
    batch: int,
    rows: int,
    length: int,
    device: torch.device,
    filled: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bool [B, L, T]: which keys each query row may attend (causal and not padding).

    The L query rows are the newest L keys written: the last L of the T keys of a growing cache,
    or those ending at `filled` (a 0-d tensor) in a preallocated one.
    """
    keys = torch.arange(length, device=device)
    end = length if filled is None else filled.to(device)
    queries = end - rows + torch.arange(rows, device=device)
    causal = (keys[None, :] <= queries[:, None]).expand(batch, rows, length)
    if attention_mask is None:
        return causal
    mask = attention_mask
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[:, 0, -rows:, :length].expand(batch, rows, length) & causal


def static_max_budget(config: SparsityConfig, length: int) -> int:
    """Slots per row that cover every row's budget in a cache of `length` positions."""
    return min(length, max(config.budget_for(length), config.min_seq_len - 1))


def row_budgets(config: SparsityConfig, lengths: torch.Tensor) -> torch.Tensor:
    """Tokens attended by each row with `lengths` valid keys (vectorised SparsityConfig.budget_for)."""
    if isinstance(config.token_budget, float):
        wanted = torch.ceil(lengths.double() * config.token_budget - 1e-9).long()
    else:
        wanted = torch.full_like(lengths, config.token_budget)
    budgets = torch.minimum(wanted.clamp_min(1), lengths)
    return torch.where(lengths < config.min_seq_len, lengths, budgets)


def dense_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Exact attention over every key (transformers' SDPA path)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def double_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function: q [B, H_q, L, d], k/v [B, H_kv, T, d] -> ([B, L, H_q, d], None)."""
    cache = kwargs.pop(CACHE_KWARG, None)
    plan: Optional[LayerPlan] = getattr(module, PLAN_ATTRIBUTE, None)
    dense_call = lambda: dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if plan is None or plan.dense or module.training or kwargs.get("sliding_window"):
        return dense_call()
    if plan.config.offload:  # Double Sparsity-Offload: K/V in host memory (doublesparse/offload.py)
        from .offload import offload_attention  # offload imports this module

        return offload_attention(module, query, attention_mask, cache, plan, scaling, dense_call)
    batch, _, rows, head_dim = query.shape
    length = key.shape[2]
    config = plan.config
    filled = _filled_length(cache, plan.layer_idx)
    if rows > 1 and not config.simulate:
        # A prefill (no past) is dense. Static caches only know their fill on the device; reading it
        # here is fine because prefills are never captured in a graph.
        past = (int(filled) if filled is not None else length) - rows
        if past == 0:
            return dense_call()
    scaling = head_dim**-0.5 if scaling is None else scaling

    valid = valid_keys(attention_mask, batch, rows, length, query.device, filled)
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    if filled is None:
        if bool((budgets >= lengths).all()):
            return dense_call()
        max_budget = int(budgets.max())
    else:
        # Preallocated cache: a fixed number of slots from shapes alone, so nothing is read back.
        max_budget = static_max_budget(config, length)
        if max_budget >= length:
            return dense_call()

    channels = plan.channels_on(query.device)
    labels = _cached_labels(cache, plan.layer_idx, length)
    if labels is None:
        labels = make_labels(key, channels, config.label_bits, config.backend)
    # A preallocated cache sees the same shapes every step: its temporaries are reused (scratch.py).
    scratch = getattr(cache, "scratch", None) if filled is not None else None
    scores = label_scores(
        gather_query_channels(query, channels), labels, config.label_bits, scaling, plan.num_select_heads, config.backend, scratch
    )
    indices, slot_valid = select_tokens(
        scores, valid, budgets, config.sink_tokens, config.recent_tokens, max_budget, config.backend, scratch
    )
    if rows == 1:
        out = sparse_attention(query, key, value, indices, slot_valid, scaling, config.backend, scratch)
    else:
        out = masked_attention_reference(query, key, value, selection_mask(indices, slot_valid, length), scaling)
    return out.transpose(1, 2).contiguous(), None


def _filled_length(cache: Any, layer_idx: int) -> Optional[torch.Tensor]:
    """Tokens written so far in a preallocated label layer (a 0-d tensor); None for growing caches."""
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if layer is None or getattr(layer, "labels", None) is None or not getattr(layer, "is_compileable", False):
        return None
    return layer.cumulative_length


def _cached_labels(cache: Any, layer_idx: int, length: int) -> Optional[Labels]:
    labels_of = getattr(cache, "labels", None)
    labels = labels_of(layer_idx) if callable(labels_of) else None
    if labels is None or labels.codes.shape[2] != length:
        return None
    return labels

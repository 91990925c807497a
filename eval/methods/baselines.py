"""The dense reference and the token-selection baselines, each a score per cached token (see `base`).

- `dense`: no selection (the reference);
- `oracle_topk`: exact q.k over all channels (the upper bound of token selection);
- `sparq`: q.k over the top-r channels of |q| of the current query (no calibration);
- `streaming_llm`: attention sinks plus the most recent tokens;
- `h2o`: accumulated attention ("heavy hitters") plus a recent window, with eviction while decoding;
- `quest`: per-page min/max key bounds, whole pages selected by their upper bound of q.k.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch

from .base import (
    AttentionCall,
    Method,
    SelectiveMethod,
    attention_weights,
    exact_logits,
    expand_kv,
    recent_window,
    reduce_to_select_heads,
)

# Evicted tokens rank below every live token but above padding and future keys (-inf), so a growing
# budget can take them back without ever reaching a key the row may not attend.
EVICTED_SCORE = -1e30
# Marks tokens a method wants before all others (H2O's recent window, Quest's current page).
PREFERRED_SCORE = 1e30


class DenseMethod(Method):
    """Exact attention over every token: the reference every method is compared with."""

    name = "dense"
    description = "exact attention over every token"
    sparse = False

    def patch(self, model, config, channels=None):
        return contextlib.nullcontext(model)


class OracleTopKMethod(SelectiveMethod):
    """Upper bound of token selection: top-k by exact q.k over every channel."""

    name = "oracle_topk"
    description = "top-k tokens by exact q.k (upper bound of token selection)"

    def scores(self, plan, call):
        return reduce_to_select_heads(exact_logits(call.query, call.key, call.scaling), call.num_select_heads)


class SparQMethod(SelectiveMethod):
    """SparQ attention: q.k over the r channels of largest |q| of the current query, no calibration."""

    name = "sparq"
    description = "top-k tokens by q.k over the top-r channels of |q| at each step"

    def scores(self, plan, call):
        query = call.query.float()
        top = query.abs().topk(plan.config.num_channels, dim=-1).indices  # [B, H_q, L, r]
        sparse_query = torch.zeros_like(query).scatter_(-1, top, query.gather(-1, top))
        return reduce_to_select_heads(exact_logits(sparse_query, call.key, call.scaling), call.num_select_heads)


class StreamingLLMMethod(SelectiveMethod):
    """StreamingLLM: a few attention-sink tokens plus the most recent tokens, whatever their scores."""

    name = "streaming_llm"
    description = "attention sinks plus a recent window"

    def __init__(self, sink_tokens: int = 4) -> None:
        self.sink_tokens = sink_tokens

    def settings(self) -> dict[str, Any]:
        return {"sink_tokens": self.sink_tokens}

    def effective_config(self, config):
        if config.sink_tokens >= self.sink_tokens:
            return config
        if isinstance(config.token_budget, int):
            room = config.token_budget - max(config.recent_tokens, 1)
            return config.replace(sink_tokens=max(config.sink_tokens, min(self.sink_tokens, room)))
        return config.replace(sink_tokens=self.sink_tokens)

    def scores(self, plan, call):
        # Newer keys score higher, so the budget left after the sinks is the recent window.
        batch, rows, length = call.valid.shape
        positions = torch.arange(length, device=call.query.device, dtype=torch.float32)
        return positions.expand(batch, call.num_select_heads, rows, length).clone()


class H2OMethod(SelectiveMethod):
    """H2O: heavy hitters by accumulated attention, plus a recent window; evicted tokens stay out.

    Decoding: the dense prefill seeds each key's accumulated attention; every step keeps the recent
    window and the heaviest live keys, evicts the rest, and adds the step's attention weights.
    Rows after a past (a continuation) run one at a time, exactly as decoding them would. Teacher-forced
    rows with no past (simulate, every-position perplexity): row i ranks keys by the attention they
    received from rows before i (causal accumulation over the pass, dense weights), with no eviction.
    """

    name = "h2o"
    description = "heavy hitters by accumulated attention plus a recent window"

    def __init__(self, recent_share: float = 0.5) -> None:
        if not 0.0 <= recent_share <= 1.0:
            raise ValueError(f"h2o recent_share must lie in [0, 1], got {recent_share}")
        self.recent_share = recent_share

    def settings(self) -> dict[str, Any]:
        return {"recent_share": self.recent_share}

    needs_prefix_attention = True

    @property
    def needs_weights(self) -> bool:
        return True

    @property
    def decodes_row_by_row(self) -> bool:
        return True  # each step evicts, so a step depends on the ones before it

    def seed_state(self, plan, prefix):
        received = prefix.received[plan.layer_idx][:, :, None, :]  # [B, H_q, 1, P]
        plan.state["accumulated"] = reduce_to_select_heads(received, plan.num_select_heads, "sum")[:, :, 0]

    def _recent_bonus(self, call: AttentionCall) -> torch.Tensor:
        counts = torch.ceil(call.budgets.double() * self.recent_share - 1e-9).long()
        return recent_window(call.valid, counts)[:, None]

    def scores(self, plan, call):
        batch, rows, length = call.valid.shape
        past = _state_to_length(plan.state.get("accumulated"), batch, call.num_select_heads, length, call.query.device)
        if call.prefill_rows:
            weights = attention_weights(exact_logits(call.query, call.key, call.scaling), call.valid[:, None])
            received = reduce_to_select_heads(weights, call.num_select_heads, "sum")
            scores = past[:, :, None, :] + received.cumsum(dim=2) - received  # rows strictly before each row
        else:
            scores = past[:, :, None, :].expand(batch, call.num_select_heads, rows, length).clone()
            evicted = _state_to_length(
                plan.state.get("evicted"), batch, call.num_select_heads, length, call.query.device
            )
            scores = scores.masked_fill(evicted[:, :, None, :].bool(), EVICTED_SCORE)
        return scores.masked_fill(self._recent_bonus(call), PREFERRED_SCORE)

    def observe(self, plan, call, weights, selected):
        batch, rows, length = call.valid.shape
        past = _state_to_length(plan.state.get("accumulated"), batch, call.num_select_heads, length, call.query.device)
        received = reduce_to_select_heads(weights.float(), call.num_select_heads, "sum").sum(dim=2)
        plan.state["accumulated"] = past + received
        if selected is not None and not call.prefill_rows:
            evicted = _state_to_length(
                plan.state.get("evicted"), batch, call.num_select_heads, length, call.query.device
            )
            newest = call.valid[:, -1][:, None]  # keys the last row could attend
            plan.state["evicted"] = (evicted.bool() | (newest & ~selected[:, :, -1])).float()


class QuestMethod(SelectiveMethod):
    """Quest: keys in pages of `page_size`; a page's score is an upper bound of q.k from its per-channel
    min and max keys; whole pages are taken in order of that bound until the budget is spent.

    The page holding the query's own position is always preferred (its bounds would otherwise be
    built from keys the row has not seen yet in teacher-forced rows).
    """

    name = "quest"
    description = "whole pages by an upper bound of q.k from per-page min/max keys"

    def __init__(self, page_size: int = 16) -> None:
        if page_size < 1:
            raise ValueError(f"quest page_size must be >= 1, got {page_size}")
        self.page_size = page_size

    def settings(self) -> dict[str, Any]:
        return {"page_size": self.page_size}

    def scores(self, plan, call):
        query, key = call.query.float(), call.key.float()
        batch, num_kv_heads, length, head_dim = key.shape
        num_pages = math.ceil(length / self.page_size)
        padded = num_pages * self.page_size
        real = call.valid[:, -1]  # [B, T]: keys that are not padding (the last row sees all the past)
        real_keys = real[:, None, :, None]
        high = key.masked_fill(~real_keys, float("-inf"))
        low = key.masked_fill(~real_keys, float("inf"))
        high = torch.nn.functional.pad(high, (0, 0, 0, padded - length), value=float("-inf"))
        low = torch.nn.functional.pad(low, (0, 0, 0, padded - length), value=float("inf"))
        page_max = high.view(batch, num_kv_heads, num_pages, self.page_size, head_dim).amax(dim=3)
        page_min = low.view(batch, num_kv_heads, num_pages, self.page_size, head_dim).amin(dim=3)
        empty = torch.isinf(page_max).all(dim=-1, keepdim=True)  # pages of padding only
        page_max = page_max.masked_fill(empty, 0.0)
        page_min = page_min.masked_fill(empty, 0.0)
        num_q_heads = query.shape[1]
        page_max, page_min = expand_kv(page_max, num_q_heads), expand_kv(page_min, num_q_heads)
        # Upper bound of q.k over a page: per channel, q times whichever extreme gives the larger product.
        per_query = query[..., None, :]
        bound = torch.maximum(per_query * page_max[:, :, None], per_query * page_min[:, :, None]).sum(-1)
        bound = reduce_to_select_heads(bound * call.scaling, call.num_select_heads)  # [B, H_s, L, P]
        token_page = torch.arange(length, device=key.device) // self.page_size
        scores = bound[..., token_page]
        rows = call.valid.shape[1]
        own_position = length - rows + torch.arange(rows, device=key.device)
        own_page = token_page[None, :] == (own_position // self.page_size)[:, None]  # [L, T]
        # Within a page, older tokens first, so a partly used page is cut at its newest tokens. The offset
        # depends on the position within the page alone, so a row ranks alike whatever keys follow it.
        within_page = torch.arange(length, device=key.device, dtype=torch.float32) % self.page_size
        tie_break = -within_page / self.page_size * 1e-3
        scores = scores + tie_break
        return scores.masked_fill(own_page[None, None], PREFERRED_SCORE)


def _state_to_length(
    state: Optional[torch.Tensor], batch: int, heads: int, length: int, device: torch.device
) -> torch.Tensor:
    """Per-key state [B, H_s, T]: zeros for keys appended since it was written."""
    if state is None:
        return torch.zeros(batch, heads, length, device=device)
    if state.shape[-1] > length:  # the cache was cropped
        return state[..., :length]
    return torch.nn.functional.pad(state, (0, length - state.shape[-1]))

"""Selection: the top-k tokens of each query row, with sink and recent tokens forced in.

Semantics (shared by every implementation and by the evaluation baselines):
- a row may attend its valid keys only (causal and not padding);
- the row's budget k counts everything it attends;
- the newest valid key (the query's own token) is always kept, with the `recent_tokens` newest
  ones; then the `sink_tokens` oldest valid ones; both are cut to fit inside k, recent first;
- the rest of the budget goes to the highest scores; equal scores go to the more recent token,
  so a selection does not depend on how long the cache buffer is (exact ties are real: a token
  whose embedding is zero, such as a padding id, scores 0 against every key).
Outputs have fixed shapes: `max_budget` slots per row; slots at or past the row's own budget are
marked invalid. No host synchronisation is needed once `max_budget` is known.
"""

from __future__ import annotations

import torch


def forced_tokens(valid: torch.Tensor, budgets: torch.Tensor, sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Bool [B, L, T]: the keys a row keeps whatever their score (current, recent, sinks)."""
    rank_from_start = valid.long().cumsum(dim=-1)
    num_valid = rank_from_start[..., -1:]
    rank_from_end = num_valid - rank_from_start + 1
    budgets = budgets[..., None]
    recent_kept = torch.clamp(budgets, max=max(recent_tokens, 1))
    sink_kept = torch.clamp(budgets - recent_kept, min=0, max=sink_tokens)
    return valid & ((rank_from_end <= recent_kept) | (rank_from_start <= sink_kept))


def ranking_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that order fp32 scores exactly, ties broken towards the higher position."""
    bits = scores.float().contiguous().view(torch.int32)
    # Flipping the magnitude bits of negative floats makes their int order match the float order.
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    positions = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return (ordered << 32) | positions


def select_tokens_reference(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (indices [B, H, L, K] int64, slot_valid [B, 1, L, K] bool), K = max_budget.

    scores: [B, H, L, T] approximate scores; valid: [B, L, T] bool; budgets: [B, L] int64 tokens
    per row (at most the row's valid count).
    """
    forced = forced_tokens(valid, budgets, sink_tokens, recent_tokens)[:, None]
    ranked = scores.float().masked_fill(~valid[:, None], float("-inf")).masked_fill(forced, float("inf"))
    indices = ranking_keys(ranked).topk(max_budget, dim=-1, sorted=True).indices
    slots = torch.arange(max_budget, device=scores.device)
    slot_valid = (slots < budgets[..., None])[:, None]
    return indices, slot_valid

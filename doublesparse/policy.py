"""The selection policy every attention path shares: which keys a row may see, and how many it attends.

- `valid_keys`: a query row may attend the keys before it (causal) that are not padding;
- `row_budgets`: each row attends `SparsityConfig.budget_for(its valid length)` tokens;
- `static_max_budget`: the slots per row a preallocated cache needs for every row's budget;
- `forced_tokens` (defined beside the selection kernels, which apply it): the current, recent and sink
  tokens a row keeps whatever their scores.
Nothing here knows which cache or backend is used, so the device, static and offload paths and the
evaluation baselines select by the same rules.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import SparsityConfig
from .kernels.selection import forced_tokens

__all__ = ["forced_tokens", "row_budgets", "static_max_budget", "valid_keys"]


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

"""The host rows a one-row offload step attends: the exact selection split into window slots and host rows.

The exact path (the layer's own query) and the predicted path (the previous layer's prediction of
it, `offload/prefetch.py`) both build a `HostSelection` with `step_selection`, so a prediction can be
compared with the exact choice (`selection_recall`) and used in its place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparsityConfig
from ..policy import forced_tokens, row_budgets, static_max_budget


@dataclass
class HostSelection:
    """Host rows a decode step attends besides the device window.

    indices [B, H_select, 1, K_host] token positions; valid [B, 1, 1, K_host]; window_valid
    [B, 1, 1, W] which window slots are attended.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    window_valid: torch.Tensor


def step_selection(
    scores: torch.Tensor, valid: torch.Tensor, config: SparsityConfig, length: int, window: int
) -> HostSelection:
    """Split the exact Double Sparsity selection of a one-row step into window slots and host rows.

    scores [B, H_select, 1, >= length - window] over stored tokens; valid [B, 1, length] over the whole
    past (current token included). The union of attended window slots and host rows is exactly the
    set `select_tokens` picks: the forced recent tokens are the window, sinks are forced host rows.
    """
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    max_budget = static_max_budget(config, length)
    forced = forced_tokens(valid, budgets, config.sink_tokens, config.recent_tokens)
    start = length - window
    window_valid = forced[..., start:]
    # Rows with at least `window` valid tokens attend min(budget, window) window slots and the rest of
    # their budget from the host; shorter rows fit in the window: K_host covers both.
    host_slots = min(max(max_budget - window, 0), start)
    need = budgets - window_valid.sum(dim=-1)
    ranked = scores[..., :start].float()
    ranked = ranked.masked_fill(~valid[:, None, :, :start], float("-inf")).masked_fill(
        forced[:, None, :, :start], float("inf")
    )
    indices = ranked.topk(host_slots, dim=-1, sorted=True).indices
    host_valid = torch.arange(host_slots, device=scores.device) < need[..., None]
    return HostSelection(indices, host_valid[:, None], window_valid[:, None])


def selection_recall(predicted: HostSelection, exact: HostSelection, length: int) -> torch.Tensor:
    """Fraction of the exact host rows that the predicted selection also holds: [B, H_select]."""

    def as_mask(selection: HostSelection) -> torch.Tensor:
        indices = selection.indices[:, :, 0]
        keep = selection.valid[:, :, 0].expand_as(indices)
        slots = torch.where(keep, indices, torch.full_like(indices, length))
        mask = torch.zeros(*indices.shape[:2], length + 1, dtype=torch.bool, device=indices.device)
        return mask.scatter_(-1, slots, True)[..., :length]

    wanted = as_mask(exact)
    found = (as_mask(predicted) & wanted).sum(dim=-1).float()
    total = wanted.sum(dim=-1).float()
    return torch.where(total > 0, found / total.clamp_min(1), torch.ones_like(total))

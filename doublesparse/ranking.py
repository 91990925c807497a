"""Channel rankings: from a statistic (RoPE pairs optionally kept together), and per-KV-head reductions for GQA.

Reducing per-query-head rankings to per-KV-head ones. Where per-channel statistics exist, the
statistics of the query heads of a group are summed (`sum_groups`) and ranked again. Where only
rankings exist (the authors' files), they are combined by Borda count (`borda_reduce`): each channel
scores the sum over the group's query heads of its position in their rankings, lower is better; ties
go to the channel with the best single position, then to the lower channel index.
"""

from __future__ import annotations

import torch


def sum_groups(stat: torch.Tensor, group: int) -> torch.Tensor:
    """Statistics [L, H_q, d] summed over each group of `group` consecutive query heads: [L, H_q // group, d]."""
    layers, heads, dim = stat.shape
    return stat.view(layers, heads // group, group, dim).sum(dim=2)


def rank_statistic(statistic: torch.Tensor, rope_pair_dim: int = 0) -> torch.Tensor:
    """Channels of every head [..., d] by decreasing statistic; with `rope_pair_dim`, RoPE pairs stay together.

    RoPE (rotate_half) rotates channel c with c + rope_pair_dim // 2 for c < rope_pair_dim // 2. With
    pairs kept, a pair ranks by the mean of its two statistics, its stronger member first, the other right
    after it; channels beyond rope_pair_dim (partial rotary) rank alone. Ties go to the lower index.
    """
    if not rope_pair_dim:
        return statistic.argsort(dim=-1, descending=True, stable=True)
    dim = statistic.shape[-1]
    half = rope_pair_dim // 2
    if rope_pair_dim % 2 or not 0 < rope_pair_dim <= dim:
        raise ValueError(f"rope_pair_dim must be even and in [2, {dim}], got {rope_pair_dim}")
    low = torch.arange(half)
    unpaired = torch.arange(rope_pair_dim, dim)
    # Units: pairs (c, c + half), then unpaired channels; an unpaired channel's second member is -1.
    first = torch.cat([low, unpaired]).expand(*statistic.shape[:-1], -1).clone()
    second = torch.cat([low + half, torch.full_like(unpaired, -1)]).expand_as(first).clone()
    pair_low, pair_high = statistic[..., :half], statistic[..., half:rope_pair_dim]
    swap = pair_high > pair_low
    first[..., :half] = torch.where(swap, low + half, low)
    second[..., :half] = torch.where(swap, low, low + half)
    unit_score = torch.cat([(pair_low + pair_high) / 2, statistic[..., rope_pair_dim:]], dim=-1)
    order = unit_score.argsort(dim=-1, descending=True, stable=True)
    members = torch.stack([first.gather(-1, order), second.gather(-1, order)], dim=-1).flatten(-2)
    return members[members >= 0].view(statistic.shape).to(torch.int64)


def borda_reduce(ranking: torch.Tensor, group: int) -> torch.Tensor:
    """Combine per-query-head rankings [L, H_q, d] into per-KV-head ones [L, H_q // group, d]."""
    layers, heads, dim = ranking.shape
    position = torch.empty_like(ranking)
    position.scatter_(-1, ranking, torch.arange(dim).expand_as(ranking).contiguous())
    position = position.view(layers, heads // group, group, dim)
    total = position.sum(dim=2)
    best = position.min(dim=2).values
    # One sortable key: total position first, then best single position, then channel index.
    key = (total * (dim + 1) + best) * dim + torch.arange(dim)
    return key.argsort(dim=-1)

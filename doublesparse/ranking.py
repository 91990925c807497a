"""Channel rankings: from a statistic (RoPE pairs optionally kept together), and per-KV-head reductions for GQA.

Reducing per-query-head rankings to per-KV-head ones. Where per-channel statistics exist, the
statistics of the query heads of a group are summed (`sum_groups`) and ranked again. Where only
rankings exist (the authors' files), they are combined by Borda count (`borda_reduce`): each channel
scores the sum over the group's query heads of its position in their rankings, lower is better; ties
go to the channel with the best single position, then to the lower channel index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch


def sum_groups(stat: torch.Tensor, group: int) -> torch.Tensor:
    """Statistics [L, H_q, d] summed over each group of `group` consecutive query heads: [L, H_q // group, d]."""
    layers, heads, dim = stat.shape
    return stat.view(layers, heads // group, group, dim).sum(dim=2)


@dataclass(frozen=True)
class RopePairs:
    """Where RoPE rotates the channels of a post-RoPE key in pairs: `dim` channels from `offset` on.

    `interleaved` False: channel offset + c turns with offset + c + dim // 2 (rotate_half, as Llama); True:
    offset + 2i with offset + 2i + 1 (Cohere, GLM, DeepSeek-V2's complex RoPE). MLA keys (DeepSeek) carry
    their rotary channels last: offset = qk_nope_head_dim. `dim` 0 means no pairs are kept.
    """

    dim: int = 0
    offset: int = 0
    interleaved: bool = False

    def check(self, head_dim: int) -> None:
        """ValueError unless these pairs lie inside a head of `head_dim` channels."""
        for name in ("dim", "offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"rope_pair_{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.interleaved, bool):
            raise ValueError(f"rope pair interleaving must be True or False, got {self.interleaved!r}")
        if self.dim and (self.dim % 2 or self.offset + self.dim > head_dim):
            raise ValueError(
                f"rope_pair_dim must be 0 or even and in [2, {head_dim - self.offset}] (channels from rope_pair_offset "
                f"{self.offset} on, in a head of {head_dim}), got {self.dim}"
            )

    def partners(self, head_dim: int) -> torch.Tensor:
        """partner[c]: the channel RoPE turns with channel c (c itself where it turns with none)."""
        self.check(head_dim)
        partner = torch.arange(head_dim)
        if not self.dim:
            return partner
        rotated = torch.arange(self.offset, self.offset + self.dim)
        if self.interleaved:
            partner[rotated] = self.offset + ((rotated - self.offset) ^ 1)
        else:
            half = self.dim // 2
            partner[rotated] = torch.cat([rotated[half:], rotated[:half]])
        return partner

    def to_calibration(self) -> dict[str, Any]:
        """The calibration metadata fields recording these pairs (the offset and style only where not default)."""
        fields: dict[str, Any] = {"rope_pair_dim": self.dim}
        if self.offset:
            fields["rope_pair_offset"] = self.offset
        if self.interleaved:
            fields["rope_pair_style"] = "interleaved"
        return fields

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], head_dim: int) -> "RopePairs":
        """The pairs a mask's calibration metadata records (none where it records none); ValueError if malformed."""
        dim = calibration.get("rope_pair_dim", 0)
        offset = calibration.get("rope_pair_offset", 0)
        style = calibration.get("rope_pair_style", "half")
        for name, value in (("rope_pair_dim", dim), ("rope_pair_offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"calibration {name} must be an int, got {value!r}")
        if style not in ROPE_STYLES:
            raise ValueError(f"calibration rope_pair_style must be one of {ROPE_STYLES}, got {style!r}")
        pairs = cls(dim, offset, style == "interleaved")
        pairs.check(head_dim)
        return pairs


ROPE_STYLES = ("half", "interleaved")


def rank_statistic(statistic: torch.Tensor, rope_pairs: Union[int, RopePairs] = 0) -> torch.Tensor:
    """Channels of every head [..., d] by decreasing statistic; with `rope_pairs`, RoPE pairs stay together.

    An int is the rotate_half layout from channel 0 (`RopePairs(dim=n)`). With pairs kept, a pair ranks by
    the mean of its two statistics, its stronger member first, the other right after it; channels RoPE
    does not turn (partial rotary, MLA's no-RoPE part) rank alone. Ties go to the lower index.
    """
    pairs = rope_pairs if isinstance(rope_pairs, RopePairs) else RopePairs(dim=rope_pairs)
    if not pairs.dim:
        return statistic.argsort(dim=-1, descending=True, stable=True)
    dim = statistic.shape[-1]
    partner = pairs.partners(dim)
    # Units in channel order, each named by its lower member: a pair (c, partner c) or a lone channel.
    lower = torch.nonzero(partner >= torch.arange(dim)).flatten()
    upper = partner[lower]
    low_stat, high_stat = statistic[..., lower], statistic[..., upper]
    swap = high_stat > low_stat
    first = torch.where(swap, upper, lower)
    second = torch.where(swap, lower, upper)
    second = torch.where(upper == lower, torch.full_like(second, -1), second)  # a lone channel has no second
    unit_score = (low_stat + high_stat) / 2
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

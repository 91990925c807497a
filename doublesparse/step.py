"""What one attention call hands to the layer that attends: `AttentionCall`, and the `SparseLayer` contract.

The attention-interface function (attention.py) wraps its arguments in an `AttentionCall` and gives it
to the cache layer of its layer. Each cache layer kind (growing, preallocated, offloaded) implements
`SparseLayer.attend` with what it alone knows (its labels, its fill, where its K/V live), so the
attention function never asks which kind of cache it was given.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

if TYPE_CHECKING:
    from .plan import LayerPlan


def dense_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Exact attention over every key (transformers' SDPA path)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@dataclass
class AttentionCall:
    """The arguments of one attention-interface call: q [B, H_q, L, d], k/v [B, H_kv, T, d], mask, scaling."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    dropout: float = 0.0
    scaling_argument: Optional[float] = None  # as the model passed it (None: 1/sqrt(head_dim))
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """The softmax scaling the model asked for, or 1/sqrt(head_dim)."""
        return self.query.shape[-1] ** -0.5 if self.scaling_argument is None else self.scaling_argument

    @property
    def rows(self) -> int:
        """Query rows in this call (1 for a decode step)."""
        return self.query.shape[2]

    def dense(self) -> tuple[torch.Tensor, None]:
        """Exact attention over the keys handed over, as the unpatched model computes it."""
        return dense_attention(
            self.module,
            self.query,
            self.key,
            self.value,
            self.attention_mask,
            dropout=self.dropout,
            scaling=self.scaling_argument,
            **self.kwargs,
        )


class SparseLayer(abc.ABC):
    """A cache layer that runs its layer's Double Sparsity attention step."""

    @abc.abstractmethod
    def attend(self, call: AttentionCall, plan: "LayerPlan") -> tuple[torch.Tensor, None]:
        """Attention of this layer's call, after `update` stored the call's new keys: ([B, L, H_q, d], None)."""

"""What one attention call hands to the layer that attends: `AttentionCall`, and the `SparseLayer` contract.

The attention-interface function (attention.py) wraps its arguments in an `AttentionCall` and gives it
to the cache layer of its layer. Each cache layer kind (growing, preallocated, offloaded) implements
`SparseLayer.attend` with what it alone knows (its labels, its fill, where its K/V live), so the
attention function never asks which kind of cache it was given.

Learned sinks (gpt-oss's `s_aux`) and logit softcapping (Gemma2's `softcap`) reach every path through
the call: `sinks` and `softcap` for the sparse kernels, and `dense()`, which computes what the model's
own eager attention computes. transformers' SDPA path would drop both, so a call with either attends
through the exact torch reference (kernels/dense_attention.py) instead.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kernels.dense_attention import dense_attention_reference
from .policy import valid_keys

if TYPE_CHECKING:
    from .plan import LayerPlan


def dense_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Exact attention over every key, as the unpatched model computes it.

    transformers' SDPA path, unless the call carries learned sinks (`s_aux`) or logit softcapping
    (`softcap`), which SDPA drops: then the torch reference, with the sinks in every softmax denominator
    and the logits capped before the mask, as gpt-oss's and Gemma2's eager attentions do.
    """
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")
    if sinks is None and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout") and module.training:
        raise ValueError(
            f"{type(module).__name__}: attention dropout ({kwargs['dropout']}) with learned sinks or softcapping is "
            "not served: train without the patch (doublesparse.remove(model)) or with attention_dropout=0"
        )
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    batch, _, rows, _ = query.shape
    length = key.shape[2]
    if attention_mask is None and rows > 1:
        # Where the model passes no mask, SDPA runs causally with the rows aligned to the first keys: a
        # preallocated cache's prefill, whose filled slots come first (the others are the rows' future).
        causal = torch.arange(length, device=query.device)[None, :] <= torch.arange(rows, device=query.device)[:, None]
        valid = causal.expand(batch, rows, length)
    else:
        valid = valid_keys(attention_mask, batch, rows, length, query.device)
    out = dense_attention_reference(query, key, value, scaling, valid, sinks=sinks, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


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
    # Inside `generate`: the prompt's length. A call with no past that has more rows holds draft tokens
    # after the prompt (assisted decoding's first round), which select like decode steps.
    prompt_rows: Optional[int] = None

    @property
    def scaling(self) -> float:
        """The softmax scaling the model asked for, or 1/sqrt(head_dim)."""
        return self.query.shape[-1] ** -0.5 if self.scaling_argument is None else self.scaling_argument

    @property
    def sinks(self) -> Optional[torch.Tensor]:
        """Learned sink logits [H_q] of this call (gpt-oss's `s_aux`), or None."""
        return self.kwargs.get("s_aux")

    @property
    def softcap(self) -> Optional[float]:
        """The logit softcap of this call (Gemma2's `attn_logit_softcapping`), or None."""
        return self.kwargs.get("softcap")

    @property
    def extras(self) -> dict[str, Any]:
        """The keyword arguments of the attention kernels this call needs: `sinks` and `softcap` where set."""
        extras = {"sinks": self.sinks, "softcap": self.softcap}
        return {name: value for name, value in extras.items() if value is not None}

    @property
    def rows(self) -> int:
        """Query rows in this call (1 for a decode step)."""
        return self.query.shape[2]

    def last_rows(self, count: int, filled: Optional[torch.Tensor] = None) -> "AttentionCall":
        """This call for its newest `count` query rows only, with an explicit boolean mask.

        The model may pass no mask when causality alone applies to a square call; for fewer rows than
        keys the mask must be spelled out. `filled` is the fill of a preallocated cache.
        """
        batch, _, rows, _ = self.query.shape
        valid = valid_keys(self.attention_mask, batch, rows, self.key.shape[2], self.query.device, filled)
        return replace(self, query=self.query[:, :, -count:], attention_mask=valid[:, None, -count:], prompt_rows=None)

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

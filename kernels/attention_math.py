"""What every attention path shares: its input checks, Gemma2's logit softcapping, softmax with gpt-oss's sinks.

The torch references (sparse_attention.py, dense_attention.py, the baselines' selective attention)
and the Triton flash-decoding kernels (flash_decode.py) check their inputs here, and the references
cap and normalize their logits with these, so every path means the same by `sinks` and `softcap`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_attention_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> None:
    """Raise ValueError where keys, values, sinks or softcap do not fit query [B, H_q, L, d_k]."""
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [B, H_kv, T, d_k] and "
            "[B, H_kv, T, d_v] with the same batch, KV heads and tokens (only the head sizes may differ)"
        )
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query head size {query.shape[-1]} must equal the key head size {keys.shape[-1]}")
    num_q_heads = query.shape[1]
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_q_heads or not sinks.is_floating_point()):
        raise ValueError(
            f"sinks must be one float logit per query head, shape [{num_q_heads}]; "
            f"got {sinks.dtype} {tuple(sinks.shape)}"
        )
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(
            f"softcap must be a positive finite number (Gemma2's attn_logit_softcapping) or None, got {softcap!r}"
        )


def cap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """tanh(logits / softcap) * softcap, as Gemma2 caps them; `logits` itself when softcap is None."""
    # Before the mask: capping a masked -inf would turn it into -softcap, a weight above zero.
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def softmax_with_sinks(logits: torch.Tensor, sink_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim with `sink_logits` (broadcast to logits[..., :1]) in each denominator; NaN -> 0."""
    # The sink is one more column of logits that is dropped after the softmax, as gpt-oss's eager
    # attention does: it only enlarges the denominator.
    if sink_logits is None:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    column = sink_logits.to(device=logits.device, dtype=logits.dtype).expand(*logits.shape[:-1], 1)
    weights = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]
    return weights.nan_to_num(0.0)  # NaN only where the sink is -inf too and no key is valid

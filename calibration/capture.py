"""Capturing post-RoPE q and k through transformers' attention interface.

A capture function is registered with the attention interface: it hands q and k (after RoPE, the
space where channels are used at run time) to the `ChannelStatistics` attached to the attention module,
then computes the real attention with transformers' SDPA path, so the forward pass is unchanged.
Because it goes through the interface, every architecture that `doublesparse.apply` serves is served.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from doublesparse.attention_patch import attention_patched

from .statistics import ChannelStatistics

CAPTURE_NAME = "doublesparse_calibration"
RECORDER_ATTRIBUTE = "_doublesparse_calibration_statistics"


def capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function: record q/k statistics, then attend exactly as SDPA does."""
    statistics: Optional[ChannelStatistics] = getattr(module, RECORDER_ATTRIBUTE, None)
    if statistics is not None:
        statistics.add(module.layer_idx, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def capturing(
    model: torch.nn.Module, modules: Sequence[torch.nn.Module], statistics: ChannelStatistics
) -> Iterator[None]:
    """Within the block, every forward of `model` adds to `statistics`; restored on exit (also on error)."""
    with attention_patched(
        model, CAPTURE_NAME, capture_attention, RECORDER_ATTRIBUTE, dict.fromkeys(modules, statistics)
    ):
        yield

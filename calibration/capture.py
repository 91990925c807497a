"""Capturing post-RoPE q and k through transformers' attention interface.

A capture function is registered with the attention interface: it hands q and k (after RoPE, the
space where channels are used at run time) to the `ChannelStatistics` attached to the attention module,
then computes the real attention as the unpatched model does (transformers' SDPA path; with learned
sinks or softcapping, the exact reference that keeps them), so the forward pass is unchanged. Its
keyword arguments are checked as the runtime checks them: what doublesparse does not understand is
refused by name. Because it goes through the interface, every architecture that `doublesparse.apply`
serves is served.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch

from doublesparse.attention_patch import attention_patched
from doublesparse.step import dense_attention
from doublesparse.support import check_attention_kwargs, check_head_sizes

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
    """Attention-interface function: record q/k statistics, then attend exactly as the unpatched model does."""
    check_attention_kwargs(module, kwargs, query.shape[1])
    check_head_sizes(module, query, key, value)
    statistics: Optional[ChannelStatistics] = getattr(module, RECORDER_ATTRIBUTE, None)
    if statistics is not None:
        statistics.add(module.layer_idx, query, key)
    return dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def capturing(
    model: torch.nn.Module, modules: Sequence[torch.nn.Module], statistics: ChannelStatistics
) -> Iterator[None]:
    """Within the block, every forward of `model` adds to `statistics`; restored on exit (also on error)."""
    with attention_patched(
        model, CAPTURE_NAME, capture_attention, RECORDER_ATTRIBUTE, dict.fromkeys(modules, statistics)
    ):
        yield

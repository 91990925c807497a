"""Label scores: approximate attention logits of every cached token from its label.

For query head h reading label head g = h // (H_q // H_label):
    score[b, h, i, n] = scaling * sum_c q_labels[b, h, i, c] * label[b, g, n, c]
With `group_reduce`, the heads that share a selection head (H_q // H_select of them) are reduced by
their maximum, so one selection serves a whole KV group: a token is kept when any query head of the
group would rank it high.
"""

from __future__ import annotations

from typing import Optional

import torch

from .label_append import Labels, dequantize_labels


def gather_query_channels(query: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The label channels of each query head: [B, H_q, L, d] -> [B, H_q, L, r]."""
    num_q_heads = query.shape[1]
    num_label_heads = channels.shape[0]
    per_label = num_q_heads // num_label_heads
    per_query = channels.to(query.device).repeat_interleave(per_label, dim=0)
    index = per_query[None, :, None, :].expand(query.shape[0], -1, query.shape[2], -1)
    return torch.gather(query, 3, index)


def label_scores_reference(
    q_labels: torch.Tensor,
    labels: Labels,
    bits: int,
    scaling: float,
    num_select_heads: Optional[int] = None,
) -> torch.Tensor:
    """Torch reference: fp32 scores [B, H_select, L, T] of T cached labels for L query rows.

    q_labels: [B, H_q, L, r]; labels: codes [B, H_label, T, ...]. `num_select_heads` (default H_q)
    divides H_q; consecutive query heads are max-reduced into one selection head.
    """
    batch, num_q_heads, rows, _ = q_labels.shape
    num_label_heads = labels.codes.shape[1]
    keys = dequantize_labels(labels, bits, torch.float32)
    keys = keys.repeat_interleave(num_q_heads // num_label_heads, dim=1)
    scores = torch.matmul(q_labels.float(), keys.transpose(-1, -2)) * scaling
    heads = num_select_heads or num_q_heads
    if heads != num_q_heads:
        scores = scores.view(batch, heads, num_q_heads // heads, rows, -1).amax(dim=2)
    return scores

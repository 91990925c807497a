"""Low-rank projection labels: a calibrated linear map of the key instead of a subset of its channels.

Channel labels keep r of a key's head_dim channels. A projection keeps r linear combinations of them,
calibrated so that the r-term dot product of the projected query and key best preserves q . k over the
calibration tokens (see calibration/projection.py): for label head h,

    key label   = key   @ key_projection[h]     [d] -> [r]
    query label = query @ query_projection[h]   [d] -> [r]   (for every query head reading label head h)

At full rank (r = head_dim) the label score equals q . k exactly. The labels are then stored and scored
exactly like channel labels (16, 8 or 4 bits, label_append.py and label_scores.py): every kernel takes
r-wide labels, so only this projection, done in torch before them, differs.

`LabelMap` is what a layer's labels are made with: a channel index tensor [H_label, r] or a
`KeyProjection`; `label_keys` and `query_labels` take either.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from .label_scores import gather_query_channels


class KeyProjection(NamedTuple):
    """Projections of one layer, per label head: `key` and `query` [H_label, d, r] (fp32)."""

    key: torch.Tensor
    query: torch.Tensor

    @property
    def device(self) -> torch.device:
        """Where the projections live."""
        return self.key.device

    @property
    def num_label_heads(self) -> int:
        """Label heads (rows of the projection)."""
        return self.key.shape[0]

    @property
    def rank(self) -> int:
        """r, the width of a label."""
        return self.key.shape[2]

    def to(self, device: Union[str, torch.device]) -> "KeyProjection":
        """The projections on `device`."""
        return KeyProjection(self.key.to(device), self.query.to(device))

    def identity_channels(self) -> torch.Tensor:
        """Channels [H_label, r] that keep every lane of a projected key (labels of projected keys are all of them)."""
        return torch.arange(self.rank, device=self.device).expand(self.num_label_heads, -1)


LabelMap = Union[torch.Tensor, KeyProjection]


def project_keys(keys: torch.Tensor, projection: KeyProjection) -> torch.Tensor:
    """Projected keys [B, H_kv, T, d] -> [B, H_label, T, r], in the keys' dtype (computed in fp32)."""
    num_label_heads = projection.num_label_heads
    if num_label_heads % keys.shape[1]:
        raise ValueError(f"{num_label_heads} label heads cannot share {keys.shape[1]} KV heads evenly")
    per_kv = num_label_heads // keys.shape[1]
    if per_kv > 1:
        keys = keys.repeat_interleave(per_kv, dim=1)
    projected = torch.matmul(keys.float(), projection.key.to(keys.device)[None])
    return projected.to(keys.dtype)


def project_queries(query: torch.Tensor, projection: KeyProjection) -> torch.Tensor:
    """Query labels [B, H_q, L, d] -> [B, H_q, L, r]: each query head through its label head's projection."""
    batch, num_q_heads, rows, head_dim = query.shape
    num_label_heads = projection.num_label_heads
    if num_q_heads % num_label_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_label_heads} label heads evenly")
    grouped = query.float().reshape(batch, num_label_heads, num_q_heads // num_label_heads * rows, head_dim)
    projected = torch.matmul(grouped, projection.query.to(query.device)[None])
    return projected.reshape(batch, num_q_heads, rows, projection.rank).to(query.dtype)


def query_labels(query: torch.Tensor, label_map: LabelMap) -> torch.Tensor:
    """The query side of the labels: the label channels of each query head, or its projection [B, H_q, L, r]."""
    if isinstance(label_map, KeyProjection):
        return project_queries(query, label_map)
    return gather_query_channels(query, label_map)

"""Calibrated low-rank label projections: second moments of post-RoPE q and k, and the maps made from them.

Per layer and KV head, over the calibration tokens (the group's query heads pooled):
    Cq = E[q q^T],  Ck = E[k k^T]                         (d x d)
    Cq^{1/2} Ck^{1/2} = U S V^T                            (SVD)
    query map = Cq^{-1/2} U S,  key map = Ck^{-1/2} V       (d x d, columns by decreasing singular value)
so that q . k = (q @ query map) . (k @ key map) exactly, and the first r columns give the rank-r labels
whose dot product keeps the most of q . k in the mean-square sense over the calibration tokens
(Eckart-Young on the whitened problem). Key labels come out whitened (unit variance per lane), which
also suits their 8- and 4-bit quantization. Eigenvalues below `EIGEN_FLOOR` times the largest are
raised to it, so a rank-deficient head still has a well-defined (and still exact) inverse.

Like `ChannelStatistics`, only float64 sums and token counts are kept, whatever the amount of data.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from doublesparse.layout import HeadLayout

EIGEN_FLOOR = 1e-6


class ProjectionStatistics:
    """Running sums over calibration tokens of q q^T (per KV group) and k k^T (per KV head), every layer."""

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout
        self.token_mask: Optional[torch.Tensor] = None
        self._q_sums: dict[int, torch.Tensor] = {}
        self._k_sums: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Add one attention call: query [B, H_q, L, d] and key [B, H_kv, T >= L, d], post-RoPE."""
        batch, num_heads, rows, head_dim = query.shape
        num_kv = key.shape[1]
        query = query.float()
        key = key[:, :, -rows:].float()
        tokens = batch * rows
        if self.token_mask is not None:
            keep = self.token_mask[:, -rows:].to(device=query.device, dtype=torch.bool)
            query = query.masked_fill(~keep[:, None, :, None], 0.0)
            key = key.masked_fill(~keep[:, None, :, None], 0.0)
            tokens = int(keep.sum())
        grouped = query.view(batch, num_kv, num_heads // num_kv, rows, head_dim).transpose(1, 0)
        grouped = grouped.reshape(num_kv, -1, head_dim)
        keys = key.transpose(1, 0).reshape(num_kv, -1, head_dim)
        self._accumulate(self._q_sums, layer, grouped.transpose(1, 2) @ grouped)
        self._accumulate(self._k_sums, layer, keys.transpose(1, 2) @ keys)
        self._tokens[layer] = self._tokens.get(layer, 0) + tokens

    def projections(self) -> dict[str, torch.Tensor]:
        """{"key", "query"}: the maps [layers, kv_heads, head_dim, head_dim] (fp32, CPU); see the module docstring."""
        layers = range(self.layout.num_layers)
        missing = [layer for layer in layers if not self._tokens.get(layer)]
        if missing:
            raise ValueError(f"no calibration token reached layers {missing}: cannot calibrate their projections")
        group = self.layout.group_size
        keys, queries = [], []
        for layer in layers:
            tokens = self._tokens[layer]
            key_map, query_map = label_maps(
                self._q_sums[layer].cpu() / (tokens * group), self._k_sums[layer].cpu() / tokens
            )
            keys.append(key_map)
            queries.append(query_map)
        return {"key": torch.stack(keys).float(), "query": torch.stack(queries).float()}

    @staticmethod
    def _accumulate(sums: dict[int, torch.Tensor], layer: int, batch_sum: torch.Tensor) -> None:
        total = sums.get(layer)
        if total is None:
            dtype = torch.float32 if batch_sum.device.type == "mps" else torch.float64
            sums[layer] = batch_sum.to(dtype)
        else:
            total += batch_sum.to(device=total.device, dtype=total.dtype)


def _sqrt_and_inverse(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of symmetric positive semi-definite matrices [..., d, d], small eigenvalues floored."""
    values, vectors = torch.linalg.eigh(moment.double())
    values = values.clamp_min(EIGEN_FLOOR * values.amax(dim=-1, keepdim=True).clamp_min(1e-300))
    root = values.sqrt()
    return (vectors * root[..., None, :]) @ vectors.transpose(-1, -2), (
        vectors / root[..., None, :]
    ) @ vectors.transpose(-1, -2)


def label_maps(query_moment: torch.Tensor, key_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key map, query map) [..., d, d] from E[q q^T] and E[k k^T] [..., d, d] (float64 inside)."""
    q_root, q_inverse = _sqrt_and_inverse(query_moment)
    k_root, k_inverse = _sqrt_and_inverse(key_moment)
    left, singular, right_t = torch.linalg.svd(q_root @ k_root)
    query_map = (q_inverse @ left) * singular[..., None, :]
    key_map = k_inverse @ right_t.transpose(-1, -2)
    return key_map, query_map


class StatisticsGroup:
    """Several recorders fed by one capture: `add` and `token_mask` reach each of them."""

    def __init__(self, members: Sequence) -> None:
        self.members = list(members)

    @property
    def token_mask(self) -> Optional[torch.Tensor]:
        """The padding mask of the current batch (shared by every member)."""
        return self.members[0].token_mask

    @token_mask.setter
    def token_mask(self, mask: Optional[torch.Tensor]) -> None:
        for member in self.members:
            member.token_mask = mask

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Hand one attention call to every member."""
        for member in self.members:
            member.add(layer, query, key)

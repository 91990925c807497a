"""Streaming per-channel calibration statistics: running sums of |q|, |k| and |q·k| per layer and head.

Only sums and a token count are kept, never activations, so memory does not grow with the amount of
calibration data. Each batch is reduced in fp32 (whatever the model's dtype) and added to float64
totals, so that the result does not depend on how the data was split into batches or ordered, beyond
rounding. The totals of a layer live on the device where that layer first ran; later batches are moved
to it (a model split over devices keeps each layer on one device anyway).
"""

from __future__ import annotations

from typing import Optional

import torch

from doublesparse.layout import HeadLayout


class ChannelStatistics:
    """Running sums over calibration tokens of |q[c]|, |k[c]| and |q[c]·k[c]| for every layer and head."""

    def __init__(self, layout: HeadLayout) -> None:
        if layout.num_heads % layout.num_kv_heads:
            raise ValueError(f"{layout.num_heads} query heads do not split into {layout.num_kv_heads} KV groups")
        self.layout = layout
        self.token_mask: Optional[torch.Tensor] = None
        self._q_sums: dict[int, torch.Tensor] = {}
        self._k_sums: dict[int, torch.Tensor] = {}
        self._qk_sums: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Add one attention call: query [B, H_q, L, d] and key [B, H_kv, T >= L, d], post-RoPE."""
        batch, num_heads, rows, head_dim = query.shape
        num_kv = key.shape[1]
        if (num_heads, num_kv, head_dim) != (self.layout.num_heads, self.layout.num_kv_heads, self.layout.head_dim):
            raise ValueError(
                f"layer {layer}: attention has {num_heads} query heads, {num_kv} KV heads and head_dim {head_dim}; "
                f"the model config says {self.layout.num_heads}, {self.layout.num_kv_heads} and {self.layout.head_dim}"
            )
        # The keys of the query rows are the newest `rows` keys (the whole key tensor without a cache).
        query = query.float()
        key = key[:, :, -rows:].float()
        valid = valid_rows(self.token_mask, batch, rows, query.device)
        group = num_heads // num_kv

        if valid is not None:
            # Zeroed padding rows add nothing to any of the three sums (q·k included).
            keep = valid[:, None, :, None]
            query = query.masked_fill(~keep, 0.0)
            key = key.masked_fill(~keep, 0.0)
            tokens = int(valid.sum())
        else:
            tokens = batch * rows
        # An L1 norm over batch and tokens is the sum of |x| without materialising |x|.
        products = query.view(batch, num_kv, group, rows, head_dim) * key[:, :, None]
        accumulate(self._q_sums, layer, torch.linalg.vector_norm(query, 1, dim=(0, 2)))
        accumulate(self._k_sums, layer, torch.linalg.vector_norm(key, 1, dim=(0, 2)))
        accumulate(self._qk_sums, layer, torch.linalg.vector_norm(products, 1, dim=(0, 3)).view(num_heads, head_dim))
        self._tokens[layer] = self._tokens.get(layer, 0) + tokens

    @property
    def tokens(self) -> int:
        """Calibration tokens seen (by the first layer; every layer sees the same tokens)."""
        return self._tokens.get(0, 0)

    def means(self) -> dict[str, torch.Tensor]:
        """Per kind ("q", "k", "qk"), the mean statistic [layers, query heads, head_dim], fp32 on the CPU.

        The k statistic is stored once per query head: each query head gets the row of its KV head.
        """
        layers = range(self.layout.num_layers)
        missing = [layer for layer in layers if layer not in self._tokens]
        if missing:
            raise ValueError(
                f"no attention call was seen for layers {missing}: the model did not run its attention through "
                "transformers' attention interface"
            )
        if any(self._tokens[layer] == 0 for layer in layers):
            raise ValueError("no calibration token was counted (every token was padding)")
        group = self.layout.group_size

        def mean(sums: dict[int, torch.Tensor], repeat: int) -> torch.Tensor:
            rows = [(sums[layer].cpu() / self._tokens[layer]).repeat_interleave(repeat, dim=0) for layer in layers]
            return torch.stack(rows).float()

        return {"q": mean(self._q_sums, 1), "k": mean(self._k_sums, group), "qk": mean(self._qk_sums, 1)}


def valid_rows(
    token_mask: Optional[torch.Tensor], batch: int, rows: int, device: torch.device
) -> Optional[torch.Tensor]:
    """The padding mask [B, rows] of a call's query rows (the last `rows` of the batch's mask), or None."""
    if token_mask is None:
        return None
    mask = token_mask[:, -rows:]
    if mask.shape != (batch, rows):
        raise ValueError(f"token mask of shape {tuple(token_mask.shape)} does not fit a batch of {batch}x{rows}")
    return mask.to(device=device, dtype=torch.bool)


def accumulate(sums: dict[int, torch.Tensor], layer: int, batch_sum: torch.Tensor) -> None:
    """Add one batch's sum to a layer's running total (float64; fp32 on MPS, which has no float64)."""
    total = sums.get(layer)
    if total is None:
        dtype = torch.float32 if batch_sum.device.type == "mps" else torch.float64
        sums[layer] = batch_sum.to(dtype)
    else:
        total += batch_sum.to(device=total.device, dtype=total.dtype)

"""`LayerPlan`: what one attention layer does under Double Sparsity, fixed when the model is patched.

A plan holds the layer's label channels, how many selection heads it ranks for, the query and KV
heads its attention calls carry (under tensor parallelism: this rank's, with the channels sliced to
them, see sharding.py), whether it stays dense, and the kernel backend. The backend is resolved once,
for the device the layer runs on, when the model is patched (and again only if the layer later runs
on another kind of device), so no op call re-decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .channels import ChannelMask
from .config import SparsityConfig
from .kernels.dispatch import resolve_backend
from .kernels.label_projection import KeyProjection, LabelMap
from .layout import HeadLayout
from .sharding import HeadShard


@dataclass
class LayerPlan:
    """One attention layer's label map (channels [H_label, r] or a `KeyProjection`) and selection heads, or dense."""

    layer_idx: int
    config: SparsityConfig
    channels: Optional[LabelMap]
    num_select_heads: int
    dense: bool = False
    backend: Optional[str] = None  # resolved ('torch', 'triton' or 'cpu') for `backend_device`
    backend_device: Optional[str] = None
    num_heads: Optional[int] = None  # query and KV heads of this layer's attention calls (this rank's)
    num_kv_heads: Optional[int] = None
    shard: Optional[HeadShard] = None  # the heads this rank holds, under tensor parallelism

    def channels_on(self, device: torch.device) -> LabelMap:
        """The label channels (or projection) on `device` (moved once, then kept there)."""
        if self.channels.device != device:
            self.channels = self.channels.to(device)
        return self.channels

    def backend_on(self, device: torch.device) -> str:
        """The resolved kernel backend for tensors on `device`."""
        if self.backend is None or self.backend_device != device.type:
            self.backend = resolve_backend(self.config.backend, device)
            self.backend_device = device.type
        return self.backend

    def check_heads(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """ValueError unless an attention call carries the query and KV heads this plan was made for."""
        if self.num_heads is None or (query.shape[1], key.shape[1]) == (self.num_heads, self.num_kv_heads):
            return
        where = f"rank {self.shard.rank} of {self.shard.world_size}, " if self.shard is not None else ""
        raise ValueError(
            f"{where}layer {self.layer_idx}: the attention call has {query.shape[1]} query heads and {key.shape[1]} "
            f"KV heads, but the plan was made for {self.num_heads} and {self.num_kv_heads}: the model's heads are "
            "split in a way doublesparse did not detect (tensor parallelism?); patch the model as it is loaded"
        )


def layer_plans(
    mask: ChannelMask,
    config: SparsityConfig,
    layout: HeadLayout,
    devices: Optional[dict[int, torch.device]] = None,
    shards: Optional[dict[int, HeadShard]] = None,
) -> dict[int, LayerPlan]:
    """One plan per layer: label channels and selection heads, or dense; backends resolved for `devices`.

    With `shards` (tensor parallelism) every layer keeps only the rows of the heads this rank holds.
    """
    if config.selection == "group":
        mask = mask.per_kv()
    label_maps = label_maps_of(mask, config)
    plans = {}
    for layer in range(layout.num_layers):
        dense = layer in config.dense_layers or layer in layout.sliding_layers
        shard = shards.get(layer) if shards else None
        num_heads = shard.num_heads if shard else layout.num_heads
        num_kv_heads = shard.num_kv_heads if shard else layout.num_kv_heads
        label_map = label_maps[layer]
        if shard:
            label_map = _label_rows(label_map, shard.rows(mask.per_kv_head))
        num_select_heads = num_kv_heads if config.selection == "group" else num_heads
        plan = LayerPlan(
            layer,
            config,
            None if dense else label_map,
            num_select_heads,
            dense,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            shard=shard,
        )
        if not dense and devices is not None and layer in devices:
            plan.backend_on(devices[layer])
        plans[layer] = plan
    return plans


def label_maps_of(mask: ChannelMask, config: SparsityConfig) -> list[LabelMap]:
    """Per layer, what labels are made with: the top-r channels, or the mask's rank-r projection (config.labels)."""
    if config.labels == "projection":
        key, query = mask.projection_tables(config.num_channels)
        return [KeyProjection(key[layer].clone(), query[layer].clone()) for layer in range(mask.num_layers)]
    top = mask.top(config.num_channels)
    return [top[layer].clone() for layer in range(mask.num_layers)]


def _label_rows(label_map: LabelMap, rows: slice) -> LabelMap:
    """The label heads `rows` of a layer's label map (a rank's heads under tensor parallelism)."""
    if isinstance(label_map, KeyProjection):
        return KeyProjection(label_map.key[rows].clone(), label_map.query[rows].clone())
    return label_map[rows].clone()

"""`LayerPlan`: what one attention layer does under Double Sparsity, fixed when the model is patched.

A plan holds the layer's label channels, how many selection heads it ranks for, whether it stays
dense, and the kernel backend. The backend is resolved once, for the device the layer runs on, when
the model is patched (and again only if the layer later runs on another kind of device), so no op
call re-decides it.
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


def layer_plans(
    mask: ChannelMask, config: SparsityConfig, layout: HeadLayout, devices: Optional[dict[int, torch.device]] = None
) -> dict[int, LayerPlan]:
    """One plan per layer: label channels and selection heads, or dense; backends resolved for `devices`."""
    if config.selection == "group":
        mask = mask.per_kv()
        num_select_heads = layout.num_kv_heads
    else:
        num_select_heads = layout.num_heads
    label_maps = label_maps_of(mask, config)
    plans = {}
    for layer in range(layout.num_layers):
        dense = layer in config.dense_layers or layer in layout.sliding_layers
        plan = LayerPlan(layer, config, None if dense else label_maps[layer], num_select_heads, dense)
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

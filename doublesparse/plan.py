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
from .layout import HeadLayout


@dataclass
class LayerPlan:
    """One attention layer's label channels [H_label, r] and selection heads, or dense."""

    layer_idx: int
    config: SparsityConfig
    channels: Optional[torch.Tensor]
    num_select_heads: int
    dense: bool = False
    backend: Optional[str] = None  # resolved ('torch', 'triton' or 'cpu') for `backend_device`
    backend_device: Optional[str] = None

    def channels_on(self, device: torch.device) -> torch.Tensor:
        """The label channels on `device` (moved once, then kept there)."""
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
    top = mask.top(config.num_channels)
    plans = {}
    for layer in range(layout.num_layers):
        dense = layer in config.dense_layers or layer in layout.sliding_layers
        plan = LayerPlan(layer, config, None if dense else top[layer].clone(), num_select_heads, dense)
        if not dense and devices is not None and layer in devices:
            plan.backend_on(devices[layer])
        plans[layer] = plan
    return plans

"""The methods that run the runtime itself: Double Sparsity (`doublesparse.patched`) and its random-channel ablation."""

from __future__ import annotations

from typing import Any, Optional

import torch

import doublesparse
from doublesparse.channels import ChannelMask
from doublesparse.layout import HeadLayout

from .base import Method


class DoubleSparsityMethod(Method):
    """Double Sparsity itself: `doublesparse.apply` with the calibrated channel mask."""

    name = "double_sparsity"
    description = "top-k tokens by q.k over r calibrated channels (label cache)"
    needs_channels = True

    def __init__(self, kind: Optional[str] = None) -> None:
        self.kind = kind  # q, k or qk; None keeps the mask's own kind

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def channel_mask(self, model: torch.nn.Module, channels: Optional[ChannelMask], seed: int = 0) -> ChannelMask:
        """The mask this method scores with."""
        if channels is None:
            raise ValueError(
                f"method {self.name!r} needs a calibrated channel mask: pass --channels or calibrate first"
            )
        return channels.with_kind(self.kind) if self.kind else channels

    def patch(self, model, config, channels=None):
        return doublesparse.patched(model, self.channel_mask(model, channels), config)

    def prefix_cache(self, model, prefix):
        # The label cache appends the prefix's labels as a patched prefill would (labels are per token).
        return prefix.fill(doublesparse.make_cache(model))


class RandomChannelsMethod(DoubleSparsityMethod):
    """Ablation: Double Sparsity with the same r but random channels instead of calibrated ones."""

    name = "random_channels"
    description = "Double Sparsity with r random channels (ablation of calibration)"
    needs_channels = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(None)
        self.seed = seed

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def run_config(self, config):
        # Random channels are the ablation of calibrated channels: projection labels do not apply.
        return config.replace(labels="channels")

    def channel_mask(self, model, channels=None, seed: int = 0) -> ChannelMask:
        layout = HeadLayout.from_config(model.config)
        generator = torch.Generator().manual_seed(self.seed)
        shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        ranking = torch.rand(shape, generator=generator).argsort(dim=-1)
        return ChannelMask(ranking, "qk", layout, per_kv_head=True, calibration={"source": f"random, seed {self.seed}"})

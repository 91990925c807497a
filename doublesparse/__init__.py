"""doublesparse: Double Sparsity (post-training sparse attention) for stock Hugging Face models."""

from __future__ import annotations

from .cache import DoubleSparseCache, LabelCacheLayer
from .channels import ChannelMask
from .config import SparsityConfig
from .layout import HeadLayout
from .patch import apply, make_cache, patch_state, patched, remove

__version__ = "0.1.0"

__all__ = [
    "ChannelMask",
    "DoubleSparseCache",
    "HeadLayout",
    "LabelCacheLayer",
    "SparsityConfig",
    "apply",
    "make_cache",
    "patch_state",
    "patched",
    "remove",
]

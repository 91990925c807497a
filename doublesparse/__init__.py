"""doublesparse: Double Sparsity (post-training sparse attention) for stock Hugging Face models."""

from __future__ import annotations

from .cache import DoubleSparseCache, LabelCacheLayer, StaticDoubleSparseCache, StaticLabelLayer
from .channels import ChannelMask
from .config import SparsityConfig
from .layout import HeadLayout
from .patch import apply, make_cache, patch_state, patched, remove

__version__ = "0.1.0"

# Calibration sits above the runtime in the dependency order (eval -> calibration -> doublesparse),
# and the bundled model pulls in its assets: both are imported only when first used.
_LAZY = {
    "calibrate": ("doublesparse.calibration", "calibrate"),
    "load_default_model": ("doublesparse.default_model", "load_default_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'doublesparse' has no attribute {name!r}")


__all__ = [
    "ChannelMask",
    "DoubleSparseCache",
    "HeadLayout",
    "LabelCacheLayer",
    "SparsityConfig",
    "StaticDoubleSparseCache",
    "StaticLabelLayer",
    "apply",
    "calibrate",
    "load_default_model",
    "make_cache",
    "patch_state",
    "patched",
    "remove",
]

"""doublesparse: Double Sparsity (post-training sparse attention) for stock Hugging Face models.

Attributes load on first use, so that `import doublesparse` (and the console command's `--help`)
imports neither torch nor transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Calibration sits above the runtime in the dependency
# order (eval -> calibration -> doublesparse), so it is reached only through this lazy table.
_EXPORTS = {
    "ChannelMask": "doublesparse.channels",
    "DoubleSparseCache": "doublesparse.cache",
    "HeadLayout": "doublesparse.layout",
    "LabelCacheLayer": "doublesparse.cache",
    "OffloadCache": "doublesparse.offload",
    "SparsityConfig": "doublesparse.config",
    "StaticDoubleSparseCache": "doublesparse.cache",
    "StaticLabelLayer": "doublesparse.cache",
    "apply": "doublesparse.patch",
    "calibrate": "doublesparse.calibration",
    "is_patched": "doublesparse.patch",
    "load_default_model": "doublesparse.default_model",
    "load_model": "doublesparse.loading",
    "make_cache": "doublesparse.patch",
    "patch_state": "doublesparse.patch",
    "patched": "doublesparse.patch",
    "remove": "doublesparse.patch",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from .cache import DoubleSparseCache, LabelCacheLayer, StaticDoubleSparseCache, StaticLabelLayer
    from .channels import ChannelMask
    from .config import SparsityConfig
    from .layout import HeadLayout
    from .loading import load_model
    from .offload import OffloadCache
    from .patch import apply, is_patched, make_cache, patch_state, patched, remove


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'doublesparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

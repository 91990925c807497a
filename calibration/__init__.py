"""Offline calibration: rank the channels of every head from post-RoPE q/k statistics over some text.

`calibrate(model, tokenizer, texts)` returns a `ChannelMask`; `read_documents(path)` reads a corpus.
Attributes load lazily so that the console command starts without importing transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "calibrate": "calibrator",
    "calibrate_blocks": "calibrator",
    "rope_pair_dim": "calibrator",
    "ChannelStatistics": "statistics",
    "read_documents": "data",
    "calibration_blocks": "data",
    "pack_blocks": "data",
    "sample_blocks": "data",
    "default_data_path": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

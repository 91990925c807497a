"""Host memory for offloaded K/V: how much there is, how much a store takes, and one budget to check against.

torch's caching pinned-memory allocator rounds every allocation up to a power of two, so a pinned
store can take up to twice its size: budgets and reports count what is really taken.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

GIB = 1 << 30


def available_host_memory() -> Optional[int]:
    """Bytes of RAM available now (MemAvailable on Linux, free pages elsewhere); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class HostMemoryBudget:
    """Bytes of host memory reserved for offloaded K/V, per layer, checked against one limit."""

    def __init__(self, limit: Optional[int]) -> None:
        self.configured = limit
        self.limit = limit if limit is not None else available_host_memory()
        self.reserved: dict[int, int] = {}

    def reserve(self, sizes: dict[int, int], what: str) -> None:
        """Set the reservation of some layers; ValueError (nothing reserved) if the total exceeds the limit."""
        wanted = {**self.reserved, **sizes}
        total = sum(wanted.values())
        if self.limit is not None and total > self.limit:
            source = (
                f"SparsityConfig.host_memory_limit={self.configured}"
                if self.configured is not None
                else "the RAM available when the cache was made"
            )
            raise ValueError(
                f"offloaded K/V for {what} needs {total / GIB:.2f} GiB of host memory, more than the "
                f"{self.limit / GIB:.2f} GiB allowed ({source}): lower the context (max_cache_len) or the batch size, "
                "list more layers in dense_layers, or raise SparsityConfig.host_memory_limit"
            )
        self.reserved = wanted


def pinned_host_stores() -> bool:
    """Whether host stores are pinned: they are wherever CUDA is present, so copies can be asynchronous."""
    return torch.cuda.is_available()


def host_store_bytes(tokens: int, row_bytes: int, pinned: Optional[bool] = None) -> int:
    """Host bytes one K or V store of `tokens` rows takes (pinned: as `pinned_host_stores()` says).

    torch's caching pinned-memory allocator rounds every allocation up to a power of two, so a pinned
    store can take up to twice its size: budgets and reports count what is really taken.
    """
    size = tokens * row_bytes
    if (pinned_host_stores() if pinned is None else pinned) and size > 0:
        return 1 << (size - 1).bit_length()
    return size


def host_kv_bytes(
    num_layers: int,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    tokens: int,
    dtype: torch.dtype,
    pinned: Optional[bool] = None,
) -> int:
    """Host bytes of the offloaded K and V of `num_layers` layers holding `tokens` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * host_store_bytes(tokens, batch * num_kv_heads * head_dim * element, pinned)

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

    def check(self, sizes: dict[int, int], what: str) -> dict[int, int]:
        """The reservation with `sizes` set for their layers; ValueError if its total exceeds the limit."""
        wanted = {**self.reserved, **sizes}
        total = sum(wanted.values())
        if self.limit is not None and total > self.limit:
            source = (
                f"SparsityConfig.host_memory_limit={self.configured}"
                if self.configured is not None
                else "the RAM available when the cache was made"
            )
            raise ValueError(
                f"offloaded K/V for {what} needs {format_bytes(total)} of host memory, more than the "
                f"{format_bytes(self.limit)} allowed ({source}): lower the context (max_cache_len) or the batch "
                "size, list more layers in dense_layers, or raise SparsityConfig.host_memory_limit"
            )
        return wanted

    def reserve(self, sizes: dict[int, int], what: str) -> None:
        """Set the reservation of some layers; ValueError (nothing reserved) if the total exceeds the limit."""
        self.reserved = self.check(sizes, what)


def format_bytes(size: int) -> str:
    """A byte count in the largest binary unit that keeps it at 1 or more: '3.00 GiB', '12.5 MiB', '640 B'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{size} B"


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
    value_dim: Optional[int] = None,
) -> int:
    """Host bytes of the offloaded K and V of `num_layers` layers holding `tokens` tokens.

    `head_dim` is the key width; `value_dim` the value width where it differs (None: the same).
    """
    element = torch.empty((), dtype=dtype).element_size()
    keys = host_store_bytes(tokens, batch * num_kv_heads * head_dim * element, pinned)
    values = host_store_bytes(tokens, batch * num_kv_heads * (value_dim or head_dim) * element, pinned)
    return num_layers * (keys + values)

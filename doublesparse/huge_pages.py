"""Host tensors on transparent huge pages: what CPU decode reads at random positions.

A Double Sparsity step reads a few thousand K/V rows (256-512 bytes each) scattered over a cache of
gigabytes. With 4 KiB pages nearly every row is a TLB miss and a page walk, on top of the memory's
own latency; with 2 MiB pages the whole cache's translations fit the TLB. Where the kernel's THP mode
is `madvise` (common, and this workplace's), memory gets huge pages only when asked for them before
it is first touched, which torch's allocator does not do (unless THP_MEM_ALLOC_ENABLE=1 is set
before torch starts). `on_huge_pages` makes a 2 MiB-aligned copy that asked; `StaticLabelLayer`
keeps its CPU buffers there, and `bench decode` gives the dense baseline's cache and the model's
weights the same pages, so both methods are measured on the same memory.

This is advice: where the mode is `never`, or the system is not Linux, the copy is ordinary memory
and nothing else changes (the pages a tensor got can be read from /proc, `process_huge_page_bytes`).
"""

from __future__ import annotations

import ctypes
import math
import sys
from pathlib import Path
from typing import Optional

import torch

HUGE_PAGE = 2 << 20
# Linux's madvise advice number (asm-generic/mman-common.h): the same on every architecture.
MADV_HUGEPAGE = 14
# Smaller tensors are left as they are: less than a huge page each, they are not what misses the TLB.
MIN_BYTES = 2 * HUGE_PAGE

_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_libc: Optional[ctypes.CDLL] = None


def huge_page_mode() -> str:
    """The kernel's THP mode (`always`, `madvise`, `never`), or `unavailable` where it has none."""
    try:
        text = _MODE_FILE.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


def _madvise(address: int, length: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(address, length, MADV_HUGEPAGE) == 0


def _advised_block(nbytes: int) -> Optional[torch.Tensor]:
    """`nbytes` of uninitialised 2 MiB-aligned CPU memory advised for huge pages, or None where advice cannot apply."""
    if nbytes < MIN_BYTES or huge_page_mode() not in ("always", "madvise"):
        return None
    # Whole huge pages, and one more so that an aligned start lies inside; the block is a view into it.
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    if not _madvise(raw.data_ptr() + start, span):
        return None
    return raw[start : start + nbytes]


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in memory advised for huge pages before its first touch.

    Returns `tensor` itself where advice cannot apply: not on the CPU, smaller than `MIN_BYTES`, the
    THP mode `never` or unknown, or madvise refused.
    """
    block = None if tensor.device.type != "cpu" else _advised_block(tensor.numel() * tensor.element_size())
    if block is None:
        return tensor
    copy = block.view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)  # the first touch: the kernel faults in huge pages where it has them free
    return copy


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """CPU zeros of `shape`, in memory advised for huge pages where they are large enough."""
    block = _advised_block(math.prod(shape) * dtype.itemsize)
    if block is None:
        return torch.zeros(shape, dtype=dtype)
    return block.view(dtype).view(shape).zero_()


def module_on_huge_pages(module: torch.nn.Module) -> int:
    """Move a module's large CPU parameters and buffers onto huge pages in place; return the bytes moved.

    Each tensor moves once (tied weights stay tied: the shared Parameter gets the new data).
    """
    moved = 0
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            data = tensor.data  # a new view object on every access: compare against this one
            copy = on_huge_pages(data)
            if copy is not data:
                tensor.data = copy
                moved += copy.numel() * copy.element_size()
    return moved


def process_huge_page_bytes() -> Optional[int]:
    """Bytes of this process's anonymous memory on huge pages (/proc/self/smaps_rollup), or None."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return None

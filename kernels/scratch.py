"""Reusable temporaries for the torch reference path of a decode step.

On the CPU each large temporary of a decode step (dequantized labels, scores, ranking keys, gathered
K/V rows) is a fresh allocation of megabytes that the allocator maps and the kernel then faults in
page by page; at long contexts those page faults cost more than the arithmetic (measured: about 13 ms
for one 8 MB temporary on this project's 2-core machine, against 0.5 ms for the gather that fills
it). A preallocated decode step asks for the same shapes at every step, so it takes its temporaries
from a `Scratch` that hands the same memory back. CUDA needs none of this: its caching allocator
already reuses memory, and the Triton kernels keep their temporaries in registers.

A tensor obtained from a `Scratch` is valid until the next request of the same name on the same
device. Buffers are kept per device, so the layers of a model split over devices (which share one
cache) each reuse their own device's temporaries instead of reallocating them at every layer.
"""

from __future__ import annotations

from typing import Optional

import torch


class Scratch:
    """Named buffers handed back for every request of the same name, shape, dtype and device."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer: the one handed out last time under `name` on `device` if it matches."""
        key = (name, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


def scratch_or_new(
    scratch: Optional[Scratch], name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`scratch.get(...)`, or a fresh tensor where no scratch is given."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.get(name, shape, dtype, device)

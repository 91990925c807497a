"""Double Sparsity-Offload's cache: full K/V in host memory, labels and the recent window on the device.

Every sparse layer's cache is an `OffloadLayer`:
- the whole K/V of the layer lives in host memory (pinned when the model runs on CUDA), token-major
  `[capacity, B, H_kv, d]`, so appending a token is one contiguous asynchronous write;
- the labels and a window of the newest `max(recent_tokens, 1)` tokens (the current one included)
  live on the device;
- a decode step copies in only the selected rows (offload/attention.py): the window fills the head
  of a device buffer, the selected host rows the rest, and sparse attention runs over the buffer. The
  full K/V is never materialised on the device.
Dense layers (configured or sliding) keep their K/V on the device, as transformers stores it.
`torch.compile`/CUDA graphs are not supported in offload mode (the host store grows and the selection
width follows the context). Build the cache with `doublesparse.make_cache(model)`; with prefetching
it also gets a `Prefetcher` (offload/prefetch.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..cache import DoubleSparseCache
from ..config import SparsityConfig
from ..kernels.dispatch import make_labels, resolve_backend
from ..kernels.label_append import Labels
from ..plan import LayerPlan
from ..step import AttentionCall, SparseLayer
from .attention import attend_offloaded
from .host_memory import HostMemoryBudget
from .host_store import HostStoredCache, HostStoredLayer, TokenBuffer


class OffloadLayer(SparseLayer, HostStoredLayer):
    """One layer's cache in offload mode: K/V in host memory, labels and the recent window on the device."""

    def __init__(self, layer_idx: int, channels: torch.Tensor, config: SparsityConfig, owner: "OffloadCache") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.channels = channels
        self.config = config
        self.owner = owner
        self.window_size = max(config.recent_tokens, 1)
        self.host_keys = TokenBuffer(dim=0, pin=True)
        self.host_values = TokenBuffer(dim=0, pin=True)
        self.label_parts: list[Optional[TokenBuffer]] = []
        self.window_keys: Optional[torch.Tensor] = None
        self.window_values: Optional[torch.Tensor] = None
        self.length = 0
        self.backend: Optional[str] = None

    # -- transformers' layer interface ----------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """As HostStoredLayer's, and the label channels moved to the keys' device."""
        super().lazy_initialization(key_states, value_states)
        self.channels = self.channels.to(self.device)
        self.backend = resolve_backend(self.config.backend, self.device)  # once, on the keys' device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new tokens (host K/V, device labels and window); return the new K/V only."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        # Stored detached: with gradients on, they reach the query of later steps, not the offloaded K/V.
        with torch.no_grad():
            token_major_keys = key_states.permute(2, 0, 1, 3).contiguous()
            token_major_values = value_states.permute(2, 0, 1, 3).contiguous()
            self._grow_host_store(self.length + count, token_major_keys, token_major_values)
            self.host_keys.append(token_major_keys)
            self.host_values.append(token_major_values)
            labels = make_labels(key_states, self.channels, self.config.label_bits, self.backend)
            if not self.label_parts:
                self.label_parts = [None if part is None else TokenBuffer(dim=2) for part in labels]
            for buffer, part in zip(self.label_parts, labels):
                if buffer is not None:
                    buffer.reserve(max(self.host_keys.capacity, buffer.length + count), part, self.device)
                    buffer.append(part)
            self._push_window(key_states, value_states)
        self.length += count
        # Only the new tokens go back: the attention function reads the store through this layer.
        return key_states, value_states

    def reset(self) -> None:
        """Forget every token (keeping the allocations)."""
        for buffer in (self.host_keys, self.host_values, *[b for b in self.label_parts if b is not None]):
            buffer.truncate(0)
        self.window_keys = self.window_values = None
        self.length = 0

    def _token_buffers(self) -> list[TokenBuffer]:
        return [self.host_keys, self.host_values, *[b for b in self.label_parts if b is not None]]

    def _after_crop(self) -> None:
        self._rebuild_window()

    # -- what the attention step reads -------------------------------------------------------------

    def attend(self, call: AttentionCall, plan: LayerPlan) -> tuple[torch.Tensor, None]:
        """The offload step: selected rows gathered from host memory, the window from the device."""
        return attend_offloaded(self, call, plan)

    @property
    def labels(self) -> Optional[Labels]:
        """The stored labels (device), one per token."""
        if not self.label_parts:
            return None
        return Labels(*(None if buffer is None else buffer.view() for buffer in self.label_parts))

    def host_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The host K and V stores, token-major [capacity, B, H_kv, d] (rows past `length` unset)."""
        return self.host_keys.data, self.host_values.data

    def memory(self) -> dict[str, int]:
        """Allocated bytes: host K/V, device labels and device window."""
        labels = sum(buffer.nbytes() for buffer in self.label_parts if buffer is not None)
        window = sum(t.numel() * t.element_size() for t in (self.window_keys, self.window_values) if t is not None)
        return {
            "host_keys": self.host_keys.nbytes(),
            "host_values": self.host_values.nbytes(),
            "device_labels": labels,
            "device_window": window,
        }

    # -- internals ------------------------------------------------------------------------------

    def _push_window(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.window_keys is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.window_keys, key_states], dim=2)
            values = torch.cat([self.window_values, value_states], dim=2)
        self.window_keys = keys[:, :, -self.window_size :].contiguous()
        self.window_values = values[:, :, -self.window_size :].contiguous()

    def _rebuild_window(self) -> None:
        if not self.length:
            self.window_keys = self.window_values = None
            return
        start = max(self.length - self.window_size, 0)
        if self.host_keys.data.is_pinned() and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.window_keys = self.host_keys.data[start : self.length].permute(1, 2, 0, 3).to(self.device).contiguous()
        self.window_values = self.host_values.data[start : self.length].permute(1, 2, 0, 3).to(self.device).contiguous()

    def _map_batch(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        if not self.length:
            return
        if self.host_keys.data.is_pinned() and torch.cuda.is_available():
            torch.cuda.synchronize()
        for buffer in (self.host_keys, self.host_values):
            buffer.replace(fn(buffer.view(), 1))
        for buffer in self.label_parts:
            if buffer is not None:
                buffer.replace(fn(buffer.view(), 0))
        self.window_keys = fn(self.window_keys, 0)
        self.window_values = fn(self.window_values, 0)


class DeviceBuffers:
    """Device buffers the selected rows are copied into: a two-slot ring for prefetches, one for sync copies."""

    def __init__(self) -> None:
        self.ring: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None, None]
        self.sync: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.next_slot = 0

    @staticmethod
    def _fit(current, shape, value_dim, dtype, device):
        value_dim = shape[3] if value_dim is None else value_dim
        if (
            current is not None
            and current[0].shape[2] >= shape[2]
            and tuple(current[0].shape[:2]) == tuple(shape[:2])
            and current[0].shape[3] == shape[3]
            and current[1].shape[3] == value_dim
            and current[0].dtype == dtype
            and current[0].device == device
        ):
            return current
        # Grow by half again, so a fraction budget does not reallocate every step.
        slots = shape[2] if current is None else max(shape[2], current[0].shape[2] * 3 // 2)
        keys = torch.empty((shape[0], shape[1], slots, shape[3]), dtype=dtype, device=device)
        return keys, torch.empty((shape[0], shape[1], slots, value_dim), dtype=dtype, device=device)

    def sync_views(self, shape, dtype, device, value_dim=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views [B, H_kv, slots, d_k] and [B, H_kv, slots, d_v] (d_v: `value_dim`, else d_k) for a
        synchronous copy."""
        self.sync = self._fit(self.sync, shape, value_dim, dtype, device)
        return tuple(t[:, :, : shape[2]] for t in self.sync)

    def ring_views(
        self, shape, dtype, device, before_realloc: Callable[[], None], value_dim=None
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(slot, K view, V view) of the next ring slot (values `value_dim` wide, else as the keys)."""
        slot = self.next_slot
        self.next_slot = 1 - slot
        fitted = self._fit(self.ring[slot], shape, value_dim, dtype, device)
        if fitted is not self.ring[slot] and self.ring[slot] is not None:
            before_realloc()
        self.ring[slot] = fitted
        return slot, *(t[:, :, : shape[2]] for t in fitted)

    def nbytes(self) -> int:
        """Bytes allocated."""
        pairs = [p for p in (*self.ring, self.sync) if p is not None]
        return sum(t.numel() * t.element_size() for pair in pairs for t in pair)


class OffloadCache(HostStoredCache, DoubleSparseCache):
    """A DynamicCache whose Double Sparsity layers are `OffloadLayer`s (Double Sparsity-Offload).

    Build it with `doublesparse.make_cache(model)` (with `max_cache_len` and `batch_size` host memory is
    checked up front); a patched model in offload mode also makes one by itself.
    """

    def __init__(
        self,
        model_config: Any,
        layer_channels: dict[int, torch.Tensor],
        config: SparsityConfig,
        max_cache_len: Optional[int] = None,
    ) -> None:
        DynamicCache.__init__(self, config=model_config)
        for index, channels in layer_channels.items():
            if type(self.layers[index]) is not DynamicLayer:
                raise ValueError(
                    f"layer {index} is a {type(self.layers[index]).__name__}; only full-attention layers are offloaded"
                )
            self.layers[index] = OffloadLayer(index, channels, config, self)
        self.sparsity = config
        self.max_cache_len = max_cache_len
        self.host_budget = HostMemoryBudget(config.host_memory_limit)
        self.buffers = DeviceBuffers()  # those of the first device that copies (the only one, unless split)
        self.device_buffers: dict[torch.device, DeviceBuffers] = {}
        # Set by doublesparse.make_cache where the config prefetches (offload/prefetch.py).
        self.prefetcher: Optional[Any] = None

    def buffers_for(self, device: torch.device) -> DeviceBuffers:
        """The copy buffers of `device`: one set per device, so layers split over devices do not share them."""
        device = torch.device(device)
        if device not in self.device_buffers:
            self.device_buffers[device] = DeviceBuffers() if self.device_buffers else self.buffers
        return self.device_buffers[device]

    def memory(self) -> dict[str, int]:
        """Allocated bytes split by place: host K/V; device labels, window, copy buffers and dense layers' K/V."""
        report = self.layer_bytes(
            {
                "host_keys": 0,
                "host_values": 0,
                "device_labels": 0,
                "device_window": 0,
                "device_keys": 0,
                "device_values": 0,
            }
        )
        distinct = {id(buffers): buffers for buffers in (self.buffers, *self.device_buffers.values())}
        report["device_buffers"] = sum(buffers.nbytes() for buffers in distinct.values())
        report["host"] = report["host_keys"] + report["host_values"]
        report["device"] = sum(
            report[name]
            for name in ("device_labels", "device_window", "device_keys", "device_values", "device_buffers")
        )
        # The keys of DoubleSparseCache.memory(), for code that reads them.
        report["keys"] = report["host_keys"] + report["device_keys"]
        report["values"] = report["host_values"] + report["device_values"]
        report["labels"] = report["device_labels"]
        report["total"] = report["host"] + report["device"]
        return report

    def prefetch_report(self) -> dict[str, Any]:
        """Measured recall of the predicted selection per layer, and the layers that copy synchronously."""
        if self.prefetcher is None:
            return {"prefetch": False}
        return self.prefetcher.report()

"""A FlexGen-like full-KV offload baseline: all K/V in host memory, each layer's whole K/V copied in per step.

`FullOffloadCache` is a transformers `DynamicCache` whose full-attention layers are `FullOffloadLayer`s:
- the K/V of a layer live in host memory (pinned when CUDA is used), token-major `[capacity, B, H_kv, d]`,
  so the filled part is one contiguous block and one copy moves it;
- at a decode step the layer's whole past is on the device in one slot of a two-slot ring; the newest
  token is written straight into that slot (and appended to the host store), and the model's own
  attention (stock SDPA, unpatched model) runs over the slot;
- while layer i computes, layer i+1's copy runs on a side stream owned by the cache, ordered by CUDA
  events: before a copy starts, an event recorded on the current stream makes the copy stream wait
  (so the appends it reads and the attention that last read its slot are done), and the layer that
  takes the copy waits on the event the copy stream recorded after it. The ring slot is chosen by a
  copy counter, not by layer parity, so consecutive copies never share a slot whatever the layer
  count; the last layer's update starts layer 0's copy for the next step.
On CPU there are no streams: the same code copies at once.

The first update of a layer (a prefill) returns the prompt's own K/V and stores them on the host; a
later update with several tokens (a chunked prefill) copies the past in and returns past and new.
The returned K/V are views of a ring slot: valid until the update two copies later reuses the slot,
which is enough for attention but not for callers that keep them.

This is a benchmark baseline (eval/bench/offload.py), not part of the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from doublesparse.layout import HeadLayout
from doublesparse.offload import HostMemoryBudget, HostStoredCache, HostStoredLayer, TokenBuffer, host_kv_bytes


class FullOffloadLayer(HostStoredLayer):
    """One layer's cache: K/V in host memory; the whole past copied to a device ring slot for each step."""

    def __init__(self, layer_idx: int, owner: "FullOffloadCache") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.host_keys = TokenBuffer(dim=0, pin=True)
        self.host_values = TokenBuffer(dim=0, pin=True)
        self.length = 0
        self.slot: Optional[int] = None  # the ring slot the latest returned K/V live in

    # -- transformers' layer interface ----------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new tokens on the host; return the whole K/V [B, H_kv, length, d] on the device."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        new_keys = key_states.permute(2, 0, 1, 3).contiguous()
        new_values = value_states.permute(2, 0, 1, 3).contiguous()
        self._check_room(self.length + count)
        if self.length == 0:
            self._store(new_keys, new_values)
            self.slot = None
            self.owner.after_update(self.layer_idx)
            return key_states, value_states
        slot, keys, values = self.owner.device_past(self, count)
        keys[self.length : self.length + count].copy_(new_keys)
        values[self.length : self.length + count].copy_(new_values)
        self._store(new_keys, new_values)
        self.slot = slot
        self.owner.after_update(self.layer_idx)
        return keys[: self.length].permute(1, 2, 0, 3), values[: self.length].permute(1, 2, 0, 3)

    def reset(self) -> None:
        """Forget every token (keeping the allocations)."""
        self.owner.forget_copies()
        self.host_keys.truncate(0)
        self.host_values.truncate(0)
        self.length = 0

    def _after_crop(self) -> None:
        # The copies in the device ring hold the past before the crop.
        self.owner.forget_copies()

    # -- storage ----------------------------------------------------------------------------------

    def host_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the host K and V stores, token-major [length, B, H_kv, d]."""
        return self.host_keys.view(), self.host_values.view()

    def memory(self) -> dict[str, int]:
        """Allocated host bytes of this layer's K and V."""
        return {"host_keys": self.host_keys.nbytes(), "host_values": self.host_values.nbytes()}

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._grow_host_store(self.length + keys.shape[0], keys, values)
        self.host_keys.append(keys)
        self.host_values.append(values)
        self.length += keys.shape[0]

    def _map_batch(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        if not self.length:
            return
        self.owner.forget_copies()
        for buffer in (self.host_keys, self.host_values):
            buffer.replace(fn(buffer.view(), 1))


@dataclass
class RingSlotCopy:
    """A layer's past being copied into ring slot `slot`, `length` tokens long."""

    slot: int
    length: int


class FullOffloadCache(HostStoredCache, DynamicCache):
    """A DynamicCache whose full-attention layers keep K/V in host memory and copy all of it in per step.

    Build it with `make_full_offload_cache(model, max_cache_len, batch_size)` to check host memory up front.
    """

    def __init__(
        self, model_config: Any, max_cache_len: Optional[int] = None, host_memory_limit: Optional[int] = None
    ) -> None:
        DynamicCache.__init__(self, config=model_config)
        # Sliding and other special layers stay as transformers made them, on the device.
        for index, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[index] = FullOffloadLayer(index, self)
        self.max_cache_len = max_cache_len
        self.host_budget = HostMemoryBudget(host_memory_limit)
        self.ring: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None, None]
        self.copies = 0  # copies started so far; the ring slot of a copy is this count mod 2
        self.pending: dict[int, RingSlotCopy] = {}
        self.copy_stream = None
        self.ready: list[Any] = []

    # -- the copies -------------------------------------------------------------------------------

    def device_past(self, layer: FullOffloadLayer, count: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(slot, K, V) token-major device buffers holding `layer`'s past, with room for `count` new tokens."""
        pending = self.pending.pop(layer.layer_idx, None)
        keys, values = self.ring[pending.slot] if pending is not None else (None, None)
        if pending is not None and pending.length == layer.length and keys.shape[0] >= layer.length + count:
            if self.copy_stream is not None:
                torch.cuda.current_stream(layer.device).wait_event(self.ready[pending.slot])
            return pending.slot, keys, values
        # No usable prefetch (the first step, or the shape changed): copy on the current stream now.
        slot, keys, values = self._claim_slot(layer, layer.length + count)
        if self.copy_stream is not None:
            # The slot's last copy may still be running on the side stream.
            torch.cuda.current_stream(layer.device).wait_event(self.ready[slot])
        host_keys, host_values = layer.host_store()
        keys[: layer.length].copy_(host_keys, non_blocking=True)
        values[: layer.length].copy_(host_values, non_blocking=True)
        return slot, keys, values

    def after_update(self, layer_idx: int) -> None:
        """Start copying the next offloaded layer's past (wrapping to the first layer for the next step)."""
        layers = self.offload_layers()
        following = next((layer for layer in layers if layer.layer_idx > layer_idx), layers[0])
        pending = self.pending.get(following.layer_idx)
        if not following.length or (pending is not None and pending.length == following.length):
            return
        slot, keys, values = self._claim_slot(following, following.length + 1)
        self.pending[following.layer_idx] = RingSlotCopy(slot, following.length)
        host_keys, host_values = following.host_store()
        if self.copy_stream is None:
            keys[: following.length].copy_(host_keys)
            values[: following.length].copy_(host_values)
            return
        # Everything enqueued so far (host appends, the attention that last read this slot) comes first.
        before = torch.cuda.Event()
        before.record(torch.cuda.current_stream(following.device))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(before)
            # The slot's memory must outlive this copy even if the cache is dropped before the copy is taken.
            for buffer in self.ring[slot]:
                buffer.record_stream(self.copy_stream)
            keys[: following.length].copy_(host_keys, non_blocking=True)
            values[: following.length].copy_(host_values, non_blocking=True)
            self.ready[slot].record(self.copy_stream)

    def forget_copies(self) -> None:
        """Drop pending copies and wait for all device work (before the host store is read, reshaped or overwritten)."""
        # Side-stream copies read the host store, and current-stream appends write it asynchronously.
        if self.copy_stream is not None or any(
            layer.is_initialized and layer.device.type == "cuda" for layer in self.offload_layers()
        ):
            torch.cuda.synchronize()
        self.pending.clear()

    def _claim_slot(self, layer: FullOffloadLayer, tokens: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The next ring slot (by copy count), sized for `tokens` tokens of `layer`; a copy using it is forgotten."""
        if self.max_cache_len is not None:
            tokens = min(tokens, self.max_cache_len)  # a full layer takes no new token: no room needed for one
        slot = self.copies % 2
        self.copies += 1
        self.pending = {index: copy for index, copy in self.pending.items() if copy.slot != slot}
        keys_store, _ = layer.host_store()
        device = layer.device
        if device.type == "cuda" and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        current = self.ring[slot]
        shape = tuple(keys_store.shape[1:])
        fits = (
            current is not None
            and current[0].shape[0] >= tokens
            and tuple(current[0].shape[1:]) == shape
            and current[0].dtype == keys_store.dtype
            and current[0].device == device
        )
        if not fits:
            if current is not None and self.copy_stream is not None:
                self.copy_stream.synchronize()  # the side stream may still write the buffer being freed
            # Grow by half again, so a growing context does not reallocate every step.
            grown = tokens if current is None else max(tokens, current[0].shape[0] * 3 // 2)
            capacity = max(grown, self.max_cache_len or 0)
            self.ring[slot] = tuple(
                torch.empty((capacity, *shape), dtype=keys_store.dtype, device=device) for _ in range(2)
            )
        keys, values = self.ring[slot]
        return slot, keys, values

    # -- accounting -------------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Allocated bytes split by place: host K/V; device ring buffers and K/V of layers kept on the device."""
        report = self.layer_bytes({"host_keys": 0, "host_values": 0, "device_keys": 0, "device_values": 0})
        report["device_buffers"] = sum(
            t.numel() * t.element_size() for pair in self.ring if pair is not None for t in pair
        )
        report["host"] = report["host_keys"] + report["host_values"]
        report["device"] = report["device_keys"] + report["device_values"] + report["device_buffers"]
        report["total"] = report["host"] + report["device"]
        return report


def make_full_offload_cache(
    model: torch.nn.Module,
    max_cache_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    host_memory_limit: Optional[int] = None,
) -> FullOffloadCache:
    """An empty full-offload cache for an unpatched model; with `max_cache_len` and `batch_size`, host memory is
    checked now."""
    sizes = (("max_cache_len", max_cache_len), ("batch_size", batch_size), ("host_memory_limit", host_memory_limit))
    for name, value in sizes:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cache = FullOffloadCache(model.config, max_cache_len, host_memory_limit)
    if max_cache_len is not None and batch_size is not None:
        layout = HeadLayout.from_config(model.config)
        dtype = next(model.parameters()).dtype
        per_layer = host_kv_bytes(1, batch_size, layout.num_kv_heads, layout.head_dim, max_cache_len, dtype)
        layers = cache.offload_layers()
        cache.host_budget.reserve(
            {layer.layer_idx: per_layer for layer in layers},
            f"{len(layers)} layers x batch {batch_size} x {max_cache_len} tokens",
        )
    return cache

"""Double Sparsity-Offload: full K/V in host memory, labels on the device, next-layer prefetch.

`SparsityConfig(offload=True)` swaps every sparse layer's cache for an `OffloadLayer`:
- the whole K/V of the layer lives in host memory (pinned when the model runs on CUDA), token-major
  `[capacity, B, H_kv, d]`, so appending a token is one contiguous asynchronous write;
- the labels and a window of the newest `max(recent_tokens, 1)` tokens (the current one included)
  live on the device;
- a decode step copies in only the selected rows: `kernels/host_gather.py` gathers them from the host
  store into a device buffer, the window fills the head of that buffer, and sparse attention runs
  over the buffer. The full K/V is never materialised on the device (a prefill attends densely over
  the prompt's own K/V, which the layer computed on the device anyway).
Sink tokens are forced into the host part of every selection (they are copied with it), so the
guarantee "current, recent and sink tokens are always attended" holds with prediction as well.

With `prefetch=True`, a forward pre-hook on decoder layer i predicts layer i+1's query from layer i's
input hidden states (layer i+1's input norm, q projection, q-norm where the model has one, and RoPE at
the current position), scores it against layer i+1's labels and selects; the selected rows are copied
on a side stream of the cache (no module-level streams), ordered by CUDA events, into one of two ring
buffers, while layer i computes. Layers in the sync set select with their own query and copy
synchronously: layer 0 always (nothing precedes it), the configured `sync_layers`, or by default the
layers whose recall (predicted host rows found in the exact selection) over the first
`prefetch_warmup_steps` decode steps of the cache is below `prefetch_min_recall`. On CPU there are no
streams: the same code runs with every copy done at once.

Limits: dense layers (configured or sliding) keep their K/V on the device, as transformers stores it;
a multi-token forward after the prefill (chunked prefill, assisted decoding) selects exactly per row
and gathers synchronously; `torch.compile`/CUDA graphs are not supported in offload mode (the host
store grows and the selection width follows the context).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.cache_utils import CacheLayerMixin

from .attention import LayerPlan, row_budgets, static_max_budget, valid_keys
from .cache import DoubleSparseCache
from .config import SparsityConfig
from .kernels.dispatch import label_scores, make_labels, select_tokens, sparse_attention, triton_available
from .kernels.host_gather import host_gather_reference, host_gather_triton
from .kernels.label_append import Labels
from .kernels.label_scores import gather_query_channels
from .kernels.selection import forced_tokens
from .kernels.sparse_attention import sparse_attention_reference

logger = logging.getLogger(__name__)

GIB = 1 << 30


# ----------------------------------------------------------------------------------------------
# Host memory


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
    num_layers: int, batch: int, num_kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype, pinned: Optional[bool] = None
) -> int:
    """Host bytes of the offloaded K and V of `num_layers` layers holding `tokens` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * host_store_bytes(tokens, batch * num_kv_heads * head_dim * element, pinned)


# ----------------------------------------------------------------------------------------------
# Storage


class TokenBuffer:
    """A tensor grown along its token dimension (capacity doubles); `view()` is the filled part."""

    def __init__(self, dim: int, pin: bool = False) -> None:
        self.dim = dim
        self.pin = pin
        self.data: Optional[torch.Tensor] = None
        self.length = 0

    @property
    def capacity(self) -> int:
        """Tokens the current allocation holds."""
        return 0 if self.data is None else self.data.shape[self.dim]

    def reserve(self, capacity: int, like: torch.Tensor, device: torch.device) -> None:
        """Allocate room for `capacity` tokens shaped like `like` (keeping what is stored)."""
        if capacity <= self.capacity:
            return
        shape = list(like.shape)
        shape[self.dim] = capacity
        pin = self.pin and device.type == "cpu" and torch.cuda.is_available()
        data = torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin)
        if self.data is not None and self.length:
            if self.data.is_pinned() and torch.cuda.is_available():
                # Pending asynchronous writes into the old store, and side-stream reads of it, must
                # finish before it is copied and freed; growth is rare (doubling), never steady state.
                torch.cuda.synchronize()
            data.narrow(self.dim, 0, self.length).copy_(self.view())
        self.data = data

    def append(self, new: torch.Tensor) -> None:
        """Write `new` after the filled part (asynchronously where it crosses to pinned memory)."""
        count = new.shape[self.dim]
        self.data.narrow(self.dim, self.length, count).copy_(new, non_blocking=True)
        self.length += count

    def view(self) -> torch.Tensor:
        """The filled part."""
        return self.data.narrow(self.dim, 0, self.length)

    def truncate(self, length: int) -> None:
        """Forget the tokens from `length` on."""
        self.length = min(self.length, length)

    def replace(self, data: torch.Tensor) -> None:
        """Store exactly `data` (a new batch arrangement), keeping pinning."""
        pin = self.pin and data.device.type == "cpu" and torch.cuda.is_available()
        self.data = data.contiguous().pin_memory() if pin else data.contiguous()
        self.length = data.shape[self.dim]

    def nbytes(self) -> int:
        """Bytes allocated (a pinned allocation counted as the allocator rounds it)."""
        if self.data is None:
            return 0
        return host_store_bytes(1, self.data.numel() * self.data.element_size(), self.data.is_pinned())


def gather_rows(store: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, backend: str) -> torch.Tensor:
    """Rows of a host store [capacity, B, H, d] picked by `indices` [B, H, N] into `out` [B, H, N, d]."""
    crosses = store.device.type == "cpu" and out.device.type == "cuda"
    if (crosses and backend != "torch" and triton_available()) or backend == "triton":
        return host_gather_triton(store, indices, out)
    return host_gather_reference(store, indices, out)


# ----------------------------------------------------------------------------------------------
# Selection shared by the exact and the predicted path


@dataclass
class HostSelection:
    """Host rows a decode step attends besides the device window.

    indices [B, H_select, 1, K_host] token positions; valid [B, 1, 1, K_host]; window_valid
    [B, 1, 1, W] which window slots are attended.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    window_valid: torch.Tensor


def step_selection(
    scores: torch.Tensor, valid: torch.Tensor, config: SparsityConfig, length: int, window: int
) -> HostSelection:
    """Split the exact Double Sparsity selection of a one-row step into window slots and host rows.

    scores [B, H_select, 1, >= length - window] over stored tokens; valid [B, 1, length] over the whole
    past (current token included). The union of attended window slots and host rows is exactly the
    set `select_tokens` picks: the forced recent tokens are the window, sinks are forced host rows.
    """
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    max_budget = static_max_budget(config, length)
    forced = forced_tokens(valid, budgets, config.sink_tokens, config.recent_tokens)
    start = length - window
    window_valid = forced[..., start:]
    # Rows with at least `window` valid tokens attend min(budget, window) window slots and the rest of
    # their budget from the host; shorter rows fit in the window: K_host covers both.
    host_slots = min(max(max_budget - window, 0), start)
    need = budgets - window_valid.sum(dim=-1)
    ranked = scores[..., :start].float()
    ranked = ranked.masked_fill(~valid[:, None, :, :start], float("-inf")).masked_fill(forced[:, None, :, :start], float("inf"))
    indices = ranked.topk(host_slots, dim=-1, sorted=True).indices
    host_valid = torch.arange(host_slots, device=scores.device) < need[..., None]
    return HostSelection(indices, host_valid[:, None], window_valid[:, None])


def selection_recall(predicted: HostSelection, exact: HostSelection, length: int) -> torch.Tensor:
    """Fraction of the exact host rows that the predicted selection also holds: [B, H_select]."""

    def as_mask(selection: HostSelection) -> torch.Tensor:
        indices = selection.indices[:, :, 0]
        keep = selection.valid[:, :, 0].expand_as(indices)
        slots = torch.where(keep, indices, torch.full_like(indices, length))
        mask = torch.zeros(*indices.shape[:2], length + 1, dtype=torch.bool, device=indices.device)
        return mask.scatter_(-1, slots, True)[..., :length]

    wanted = as_mask(exact)
    found = (as_mask(predicted) & wanted).sum(dim=-1).float()
    total = wanted.sum(dim=-1).float()
    return torch.where(total > 0, found / total.clamp_min(1), torch.ones_like(total))


# ----------------------------------------------------------------------------------------------
# The offloaded layer and cache


class HostStoredLayer(CacheLayerMixin):
    """The transformers layer interface of a cache layer whose K/V live in host memory.

    Subclasses count their tokens in `length`, keep K/V token-major in `host_keys` / `host_values`
    (TokenBuffers), belong to an `owner` HostStoredCache, and implement `_map_batch(fn)`, which
    applies `fn(tensor, batch_dim)` to every tensor with a batch dimension.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True
    layer_idx: int
    length: int
    owner: "HostStoredCache"
    host_keys: TokenBuffer
    host_values: TokenBuffer

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """(key length, offset) of the attention mask; takes a query length or cache positions."""
        rows = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.length + rows, 0

    def get_seq_length(self) -> int:
        """Tokens stored."""
        return self.length

    def get_max_length(self) -> int:
        """The preallocated length, or -1 when the store grows."""
        return self.owner.max_cache_len or -1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take dtype and device from the first keys; reserve host memory for the whole cache."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.owner.reserve_host_memory(key_states)
        self.is_initialized = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        self._map_batch(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times."""
        self._map_batch(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows in `indices`."""
        self._map_batch(lambda t, dim: t.index_select(dim, indices.to(t.device)))

    def _map_batch(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        raise NotImplementedError

    def _check_room(self, needed: int) -> None:
        """ValueError if `needed` tokens exceed the cache's preallocated length."""
        limit = self.owner.max_cache_len
        if limit is not None and needed > limit:
            raise ValueError(f"the cache was made for max_cache_len={limit} tokens; {needed} do not fit: make it larger")

    def _grow_host_store(self, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` tokens in the host K/V stores (rows like `like[0]`), within the cache's budget."""
        if needed <= self.host_keys.capacity:
            return
        self._check_room(needed)
        limit = self.owner.max_cache_len
        capacity = limit if limit is not None else max(needed, 2 * self.host_keys.capacity, 256)
        store_bytes = host_store_bytes(capacity, like[0].numel() * like.element_size())
        self.owner.host_budget.reserve({self.layer_idx: 2 * store_bytes}, f"layer {self.layer_idx} at {capacity} tokens")
        host = torch.device("cpu")
        self.host_keys.reserve(capacity, like, host)
        self.host_values.reserve(capacity, like, host)


class HostStoredCache:
    """What a cache of HostStoredLayers shares: the list of those layers and host memory reservation.

    Mixed into a DynamicCache that sets `max_cache_len` and `host_budget` (a HostMemoryBudget).
    """

    layers: list
    max_cache_len: Optional[int]
    host_budget: HostMemoryBudget

    def offload_layers(self) -> list[HostStoredLayer]:
        """The layers whose K/V live in host memory, in order."""
        return [layer for layer in self.layers if isinstance(layer, HostStoredLayer)]

    def reserve_host_memory(self, key_states: torch.Tensor) -> None:
        """With a preallocated length, reserve (and check) host memory for every layer at once."""
        if self.max_cache_len is None:
            return
        batch, heads, _, head_dim = key_states.shape
        per_layer = host_kv_bytes(1, batch, heads, head_dim, self.max_cache_len, key_states.dtype)
        layers = self.offload_layers()
        self.host_budget.reserve(
            {layer.layer_idx: per_layer for layer in layers},
            f"{len(layers)} layers x batch {batch} x {self.max_cache_len} tokens",
        )

    def layer_bytes(self, report: dict[str, int]) -> dict[str, int]:
        """Add each host-stored layer's memory() to `report`, and the device K/V of the other layers."""
        for layer in self.layers:
            if isinstance(layer, HostStoredLayer):
                for name, value in layer.memory().items():
                    report[name] += value
            else:
                for name in ("keys", "values"):
                    tensor = getattr(layer, name, None)
                    report[f"device_{name}"] += 0 if tensor is None else tensor.numel() * tensor.element_size()
        return report


class OffloadLayer(HostStoredLayer):
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

    # -- transformers' layer interface ----------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """As HostStoredLayer's, and the label channels moved to the keys' device."""
        super().lazy_initialization(key_states, value_states)
        self.channels = self.channels.to(self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new tokens (host K/V, device labels and window); return the new K/V only."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        token_major_keys = key_states.permute(2, 0, 1, 3).contiguous()
        token_major_values = value_states.permute(2, 0, 1, 3).contiguous()
        self._grow_host_store(self.length + count, token_major_keys)
        self.host_keys.append(token_major_keys)
        self.host_values.append(token_major_values)
        labels = make_labels(key_states, self.channels, self.config.label_bits, self.config.backend)
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

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (a negative count, as DynamicLayer.crop takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.length:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        for buffer in (self.host_keys, self.host_values, *[b for b in self.label_parts if b is not None]):
            buffer.truncate(self.length)
        self._rebuild_window()

    # -- what the attention function reads --------------------------------------------------------

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
    def _fit(current, shape, dtype, device):
        if current is not None and current[0].shape[2] >= shape[2] and tuple(current[0].shape[:2]) == tuple(shape[:2]) and current[0].shape[3] == shape[3] and current[0].dtype == dtype and current[0].device == device:
            return current
        # Grow by half again, so a fraction budget does not reallocate every step.
        slots = shape[2] if current is None else max(shape[2], current[0].shape[2] * 3 // 2)
        full = (shape[0], shape[1], slots, shape[3])
        return torch.empty(full, dtype=dtype, device=device), torch.empty(full, dtype=dtype, device=device)

    def sync_views(self, shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views [B, H_kv, slots, d] for a synchronous copy."""
        self.sync = self._fit(self.sync, shape, dtype, device)
        return tuple(t[:, :, : shape[2]] for t in self.sync)

    def ring_views(self, shape, dtype, device, before_realloc: Callable[[], None]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(slot, K view, V view) of the next ring slot."""
        slot = self.next_slot
        self.next_slot = 1 - slot
        fitted = self._fit(self.ring[slot], shape, dtype, device)
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

    Build it with `doublesparse.make_cache(model)` (or `make_offload_cache` to check host memory for a
    known batch up front); a patched model in offload mode also makes one by itself.
    """

    def __init__(
        self,
        model_config: Any,
        layer_channels: dict[int, torch.Tensor],
        config: SparsityConfig,
        max_cache_len: Optional[int] = None,
        measure_recall: bool = False,
    ) -> None:
        DynamicCache.__init__(self, config=model_config)
        for index, channels in layer_channels.items():
            if type(self.layers[index]) is not DynamicLayer:
                raise ValueError(f"layer {index} is a {type(self.layers[index]).__name__}; only full-attention layers are offloaded")
            self.layers[index] = OffloadLayer(index, channels, config, self)
        self.sparsity = config
        self.max_cache_len = max_cache_len
        self.host_budget = HostMemoryBudget(config.host_memory_limit)
        self.buffers = DeviceBuffers()
        self.prefetcher = Prefetcher(self, measure_recall) if config.prefetch else None

    def memory(self) -> dict[str, int]:
        """Allocated bytes split by place: host K/V; device labels, window, copy buffers and dense layers' K/V."""
        report = self.layer_bytes(
            {"host_keys": 0, "host_values": 0, "device_labels": 0, "device_window": 0, "device_keys": 0, "device_values": 0}
        )
        report["device_buffers"] = self.buffers.nbytes()
        report["host"] = report["host_keys"] + report["host_values"]
        report["device"] = sum(report[name] for name in ("device_labels", "device_window", "device_keys", "device_values", "device_buffers"))
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


def make_offload_cache(
    model: torch.nn.Module,
    max_cache_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    measure_recall: bool = False,
) -> OffloadCache:
    """An empty offload cache for a patched model; with `max_cache_len` and `batch_size`, host memory is checked now."""
    from .patch import patch_state  # patch imports this module

    state = patch_state(model)
    if not state.config.offload:
        raise ValueError("the model is not patched in offload mode: apply it with SparsityConfig(offload=True)")
    for name, value in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    layer_channels = {i: plan.channels for i, plan in state.plans.items() if not plan.dense}
    cache = OffloadCache(model.config, layer_channels, state.config, max_cache_len, measure_recall)
    if max_cache_len is not None and batch_size is not None:
        layout = state.layout
        dtype = next(model.parameters()).dtype
        per_layer = host_kv_bytes(1, batch_size, layout.num_kv_heads, layout.head_dim, max_cache_len, dtype)
        cache.host_budget.reserve(
            {i: per_layer for i in layer_channels}, f"{len(layer_channels)} layers x batch {batch_size} x {max_cache_len} tokens"
        )
    return cache


# ----------------------------------------------------------------------------------------------
# Next-layer query prediction


@dataclass
class QueryPredictor:
    """Layer j's post-RoPE query computed from hidden states: its input norm, q projection, q-norm, RoPE."""

    norm: torch.nn.Module
    attention: torch.nn.Module
    rotate: Callable
    num_heads: int
    head_dim: int
    scaling: float

    def __call__(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[B, L, hidden] -> query [B, H_q, L, d]."""
        normed = self.norm(hidden_states)
        projection = getattr(self.attention, "q_proj", None)
        if projection is not None:
            query = projection(normed)
        else:
            fused = self.attention.qkv_proj  # query rows come first in a fused projection
            width = self.num_heads * self.head_dim
            bias = None if fused.bias is None else fused.bias[:width]
            query = F.linear(normed, fused.weight[:width], bias)
        query = query.view(*normed.shape[:-1], -1, self.head_dim)
        q_norm = getattr(self.attention, "q_norm", None)
        if q_norm is not None:
            query = q_norm(query)
        query = query.transpose(1, 2)
        cos, sin = position_embeddings
        query, _ = self.rotate(query, query, cos, sin)
        return query


def query_predictors(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> dict[int, tuple[torch.nn.Module, QueryPredictor]]:
    """For every layer: (its decoder layer, its query predictor); ValueError where the model's modules are not found."""
    parents = {}
    for _, module in model.named_modules():
        attention = getattr(module, "self_attn", None)
        if isinstance(attention, torch.nn.Module):
            parents[id(attention)] = module
    found = {}
    for index, attention in enumerate(attention_modules):
        decoder_layer = parents.get(id(attention))
        norm = getattr(decoder_layer, "input_layernorm", None)
        rotate = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        has_projection = isinstance(getattr(attention, "q_proj", None), torch.nn.Linear) or isinstance(
            getattr(attention, "qkv_proj", None), torch.nn.Linear
        )
        if decoder_layer is None or not isinstance(norm, torch.nn.Module) or rotate is None or not has_projection:
            raise ValueError(
                f"{type(model).__name__} layer {index}: prefetch predicts the next layer's query from a decoder layer with "
                "`self_attn` (with q_proj or qkv_proj), `input_layernorm` and its module's `apply_rotary_pos_emb`, "
                "and this model lacks one of them: use SparsityConfig(offload=True, prefetch=False)"
            )
        text = attention.config.get_text_config(decoder=True) if hasattr(attention.config, "get_text_config") else attention.config
        head_dim = attention.head_dim
        found[index] = (
            decoder_layer,
            QueryPredictor(norm, attention, rotate, text.num_attention_heads, head_dim, getattr(attention, "scaling", head_dim**-0.5)),
        )
    return found


def install_prefetch_hooks(
    predictors: dict[int, tuple[torch.nn.Module, QueryPredictor]], plans: dict[int, LayerPlan]
) -> list[Any]:
    """A forward pre-hook on every decoder layer i that starts the prefetch of layer i+1; returns the handles."""
    handles = []
    for index in sorted(predictors):
        following = index + 1
        target = predictors.get(following)
        plan = plans.get(following)
        decoder_layer = predictors[index][0]
        if target is None or plan is None or plan.dense:
            handles.append(decoder_layer.register_forward_pre_hook(_step_counter(index), with_kwargs=True))
            continue
        handles.append(decoder_layer.register_forward_pre_hook(_prefetch_hook(index, following, target[1], plan), with_kwargs=True))
    return handles


def _hook_inputs(args: tuple, kwargs: dict):
    hidden = args[0] if args else kwargs.get("hidden_states")
    return kwargs.get("past_key_values"), hidden


def _step_counter(index: int):
    def count_decode_step(module: torch.nn.Module, args: tuple, kwargs: dict):
        cache, hidden = _hook_inputs(args, kwargs)
        if index == 0 and isinstance(cache, OffloadCache) and cache.prefetcher is not None:
            cache.prefetcher.begin_step(hidden)
        return None

    return count_decode_step


def _prefetch_hook(index: int, following: int, predictor: QueryPredictor, plan: LayerPlan):
    def prefetch_next_layer(module: torch.nn.Module, args: tuple, kwargs: dict):
        cache, hidden = _hook_inputs(args, kwargs)
        if not isinstance(cache, OffloadCache) or cache.prefetcher is None or hidden is None:
            return None
        if index == 0:
            cache.prefetcher.begin_step(hidden)
        with torch.no_grad():
            cache.prefetcher.prefetch(following, hidden, kwargs.get("position_embeddings"), kwargs.get("attention_mask"), predictor, plan)
        return None

    return prefetch_next_layer


# ----------------------------------------------------------------------------------------------
# Prefetcher


@dataclass
class PendingCopy:
    """A selection made for layer `layer_idx` at key length `length`, and where its rows are being copied."""

    layer_idx: int
    length: int
    selection: HostSelection
    slot: Optional[int] = None
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None


@dataclass
class RecallTally:
    """Running mean of the recall of one layer's predicted selection."""

    total: float = 0.0
    steps: int = 0

    @property
    def mean(self) -> float:
        """Mean recall over the measured steps."""
        return self.total / self.steps if self.steps else float("nan")


class Prefetcher:
    """Predicts each layer's selection one layer early and copies its rows on a side stream (per cache)."""

    def __init__(self, cache: OffloadCache, measure_recall: bool = False) -> None:
        self.cache = cache
        self.config = cache.sparsity
        self.measure_always = measure_recall
        self.decode_steps = 0
        self.pending: dict[int, PendingCopy] = {}
        self.recall: dict[int, RecallTally] = {}
        self.predicted_layers: set[int] = set()
        self.chosen_sync: Optional[set[int]] = None
        self.copy_stream = None
        self.ready: list[Any] = []
        self.consumed: list[Any] = []

    # -- decisions --------------------------------------------------------------------------------

    def begin_step(self, hidden: torch.Tensor) -> None:
        """Count a decode step (called at the first decoder layer)."""
        if hidden is None or hidden.shape[1] != 1 or not any(layer.length for layer in self.cache.offload_layers()):
            return
        self.decode_steps += 1
        self.pending.clear()
        if self.config.sync_layers is None and self.chosen_sync is None and self.decode_steps > self.config.prefetch_warmup_steps:
            self.chosen_sync = {i for i in self.predicted_layers if not self.recall.get(i) or self.recall[i].mean < self.config.prefetch_min_recall}
            if self.recall:
                logger.info("doublesparse offload: layers copying synchronously after the warm-up: %s", sorted(self.chosen_sync))

    def warming_up(self) -> bool:
        """Whether this step measures recall to choose the sync layers (every layer then copies synchronously)."""
        return self.config.sync_layers is None and self.chosen_sync is None

    def uses_prediction(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends over its predicted selection in this step."""
        if layer_idx not in self.predicted_layers:
            return False
        if self.config.sync_layers is not None:
            return layer_idx not in self.config.sync_layers
        return self.chosen_sync is not None and layer_idx not in self.chosen_sync

    def measures(self, layer_idx: int) -> bool:
        """Whether this step compares layer `layer_idx`'s prediction with its exact selection."""
        return layer_idx in self.predicted_layers and (self.measure_always or self.warming_up())

    def sync_layers(self) -> list[int]:
        """Layers that select with their own query now (layer 0 and layers never predicted included)."""
        return [layer.layer_idx for layer in self.cache.offload_layers() if not self.uses_prediction(layer.layer_idx)]

    # -- the copy -------------------------------------------------------------------------------------

    def prefetch(self, layer_idx: int, hidden: torch.Tensor, position_embeddings, attention_mask, predictor: QueryPredictor, plan: LayerPlan) -> None:
        """At the start of layer layer_idx-1: predict layer `layer_idx`'s selection and start copying its rows."""
        layer = self.cache.layers[layer_idx]
        if not isinstance(layer, OffloadLayer) or not layer.length or hidden.shape[1] != 1 or position_embeddings is None:
            return
        self.predicted_layers.add(layer_idx)
        use, measure = self.uses_prediction(layer_idx), self.measures(layer_idx)
        if not (use or measure):
            return
        length = layer.length + 1  # the current token joins the layer in its own attention call
        query = predictor(hidden, position_embeddings)
        valid = valid_keys(attention_mask, hidden.shape[0], 1, length, hidden.device)
        scores = label_scores(
            gather_query_channels(query, plan.channels_on(query.device)), layer.labels, self.config.label_bits,
            predictor.scaling, plan.num_select_heads, self.config.backend,
        )
        window = min(layer.window_size, length)
        selection = step_selection(scores, valid, self.config, length, window)
        pending = PendingCopy(layer_idx, length, selection)
        if use:
            self._start_copy(layer, pending, window)
        self.pending[layer_idx] = pending

    def take(self, layer_idx: int, length: int) -> Optional[PendingCopy]:
        """The prediction made for this layer and step, if any (its copy waited for on the device)."""
        pending = self.pending.pop(layer_idx, None)
        if pending is None or pending.length != length:
            return None
        if pending.slot is not None and self.copy_stream is not None:
            torch.cuda.current_stream().wait_event(self.ready[pending.slot])
        return pending

    def release(self, pending: PendingCopy) -> None:
        """Mark the ring slot of `pending` free once the attention reading it has run."""
        if pending.slot is not None and self.copy_stream is not None:
            self.consumed[pending.slot].record(torch.cuda.current_stream())

    def record_recall(self, layer_idx: int, predicted: HostSelection, exact: HostSelection, length: int) -> None:
        """Add one step's recall of layer `layer_idx` (reads one number back to the host)."""
        tally = self.recall.setdefault(layer_idx, RecallTally())
        tally.total += float(selection_recall(predicted, exact, length).mean())
        tally.steps += 1

    def report(self) -> dict[str, Any]:
        """JSON-ready: per-layer mean recall, steps, and the layers copying synchronously."""
        return {
            "prefetch": True,
            "decode_steps": self.decode_steps,
            "recall": {str(i): self.recall[i].mean for i in sorted(self.recall)},
            "recall_steps": {str(i): self.recall[i].steps for i in sorted(self.recall)},
            "sync_layers": self.sync_layers(),
            "sync_rule": "configured" if self.config.sync_layers is not None else f"recall < {self.config.prefetch_min_recall} over {self.config.prefetch_warmup_steps} warm-up steps",
        }

    def _start_copy(self, layer: OffloadLayer, pending: PendingCopy, window: int) -> None:
        selection = pending.selection
        batch, num_select, _, host_slots = selection.indices.shape
        keys_store, values_store = layer.host_store()
        heads, head_dim = keys_store.shape[2], keys_store.shape[3]
        shape = (batch, heads, window + (num_select // heads) * host_slots, head_dim)
        cuda = layer.device.type == "cuda"
        if cuda and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=layer.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.consumed = [torch.cuda.Event(), torch.cuda.Event()]
        slot, keys, values = self.cache.buffers.ring_views(
            shape, keys_store.dtype, layer.device, before_realloc=self.copy_stream.synchronize if cuda else (lambda: None)
        )
        pending.slot, pending.keys, pending.values = slot, keys, values
        indices = selection.indices.reshape(batch, heads, -1)
        if not cuda:
            gather_rows(keys_store, indices, keys[:, :, window:], self.config.backend)
            gather_rows(values_store, indices, values[:, :, window:], self.config.backend)
            return
        selected = torch.cuda.Event()
        selected.record(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(selected)
            self.copy_stream.wait_event(self.consumed[slot])
            indices.record_stream(self.copy_stream)
            gather_rows(keys_store, indices, keys[:, :, window:], self.config.backend)
            gather_rows(values_store, indices, values[:, :, window:], self.config.backend)
            self.ready[slot].record(self.copy_stream)


# ----------------------------------------------------------------------------------------------
# The attention step


def offload_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    cache: Any,
    plan: LayerPlan,
    scaling: Optional[float],
    dense_call: Callable[[], tuple[torch.Tensor, None]],
) -> tuple[torch.Tensor, None]:
    """Offload-mode attention of one layer: gather the selected rows from host memory, attend over them."""
    layers = getattr(cache, "layers", None)
    layer = layers[plan.layer_idx] if layers is not None and plan.layer_idx < len(layers) else None
    if not isinstance(layer, OffloadLayer):
        raise ValueError(
            "SparsityConfig(offload=True) needs the offload cache: pass no cache, an empty DynamicCache or "
            "doublesparse.make_cache(model)"
        )
    batch, _, rows, head_dim = query.shape
    length = layer.length
    if rows == length:
        return dense_call()  # a prefill: the K/V handed over are the prompt's own, computed on the device
    config = plan.config
    scaling = head_dim**-0.5 if scaling is None else scaling
    channels = plan.channels_on(query.device)
    if rows > 1:
        return _multi_row_attention(layer, query, attention_mask, plan, channels, scaling), None

    valid = valid_keys(attention_mask, batch, 1, length, query.device)
    window = layer.window_keys.shape[2]
    prefetcher = layer.owner.prefetcher
    pending = prefetcher.take(plan.layer_idx, length) if prefetcher is not None else None
    predicted = pending is not None and pending.keys is not None and prefetcher.uses_prediction(plan.layer_idx)
    exact = None
    if not predicted or prefetcher.measures(plan.layer_idx):
        scores = label_scores(gather_query_channels(query, channels), layer.labels, config.label_bits, scaling, plan.num_select_heads, config.backend)
        exact = step_selection(scores, valid, config, length, window)
        if pending is not None and prefetcher.measures(plan.layer_idx):
            prefetcher.record_recall(plan.layer_idx, pending.selection, exact, length)

    heads = layer.window_keys.shape[1]
    if predicted:
        selection, keys, values = pending.selection, pending.keys, pending.values
    else:
        selection = exact
        host_slots = selection.indices.shape[-1] * (selection.indices.shape[1] // heads)
        shape = (batch, heads, window + host_slots, head_dim)
        keys, values = layer.owner.buffers.sync_views(shape, layer.window_keys.dtype, query.device)
        indices = selection.indices.reshape(batch, heads, -1)
        keys_store, values_store = layer.host_store()
        gather_rows(keys_store, indices, keys[:, :, window:], config.backend)
        gather_rows(values_store, indices, values[:, :, window:], config.backend)
    keys[:, :, :window].copy_(layer.window_keys)
    values[:, :, :window].copy_(layer.window_values)

    num_select, host_slots = selection.indices.shape[1], selection.indices.shape[-1]
    per_kv = num_select // heads
    # Buffer slot of each attended row: the window first (shared by a KV head's selection heads),
    # then each selection head's own host rows.
    window_slots = torch.arange(window, device=query.device).expand(num_select, window)
    own_slots = window + (torch.arange(num_select, device=query.device) % per_kv)[:, None] * host_slots + torch.arange(host_slots, device=query.device)
    local = torch.cat([window_slots, own_slots], dim=1)[None, :, None, :].expand(batch, -1, 1, -1)
    slot_valid = torch.cat([selection.window_valid, selection.valid], dim=-1)
    out = sparse_attention(query, keys, values, local, slot_valid, scaling, config.backend)
    if pending is not None and prefetcher is not None:
        prefetcher.release(pending)
    return out.transpose(1, 2).contiguous(), None


def _multi_row_attention(layer: OffloadLayer, query, attention_mask, plan: LayerPlan, channels, scaling) -> torch.Tensor:
    """Several new rows after a past (chunked prefill, assisted decoding): exact per-row selection, synchronous copy."""
    config = plan.config
    batch, _, rows, head_dim = query.shape
    length = layer.length
    valid = valid_keys(attention_mask, batch, rows, length, query.device)
    budgets = row_budgets(config, valid.sum(dim=-1))
    max_budget = static_max_budget(config, length)
    scores = label_scores(gather_query_channels(query, channels), layer.labels, config.label_bits, scaling, plan.num_select_heads, config.backend)
    indices, slot_valid = select_tokens(scores, valid, budgets, config.sink_tokens, config.recent_tokens, max_budget, config.backend)
    keys_store, values_store = layer.host_store()
    heads = keys_store.shape[2]
    flat = indices.reshape(batch, heads, -1)
    keys = torch.empty(batch, heads, flat.shape[2], head_dim, dtype=keys_store.dtype, device=query.device)
    values = torch.empty_like(keys)
    gather_rows(keys_store, flat, keys, config.backend)
    gather_rows(values_store, flat, values, config.backend)
    per_head = flat.shape[2] // (indices.shape[1] // heads)
    local = (torch.arange(per_head * (indices.shape[1] // heads), device=query.device).repeat(heads)).view(indices.shape[1:])
    out = sparse_attention_reference(query, keys, values, local[None].expand(batch, -1, -1, -1), slot_valid, scaling)
    return out.transpose(1, 2).contiguous()

"""Token-major host storage and the layer/cache bases of every cache whose K/V live in host memory.

`TokenBuffer` grows a tensor along its token dimension; `gather_rows` copies selected rows of a host
store to the device. `HostStoredLayer` is the transformers layer interface of a layer kept that way
(batch reorder and selection, crop, the host store grown within the cache's memory budget);
`HostStoredCache` is what such caches share. Double Sparsity-Offload (`offload/cache.py`) and the
full-KV offload baseline of the benchmarks both build on them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from ..kernels.dispatch import triton_available
from ..kernels.host_gather import host_gather_reference, host_gather_triton
from .host_memory import HostMemoryBudget, host_kv_bytes, host_store_bytes


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
        self.owner.reserve_host_memory(key_states, value_states)
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

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (a negative count, as DynamicLayer.crop takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.length:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        for buffer in self._token_buffers():
            buffer.truncate(self.length)
        self._after_crop()

    def _token_buffers(self) -> list[TokenBuffer]:
        """Every buffer indexed by token, which crop truncates together."""
        return [self.host_keys, self.host_values]

    def _after_crop(self) -> None:
        """What a subclass keeps besides its token buffers, brought back in step after a crop."""

    def _map_batch(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        raise NotImplementedError

    def _check_room(self, needed: int) -> None:
        """ValueError if `needed` tokens exceed the cache's preallocated length."""
        limit = self.owner.max_cache_len
        if limit is not None and needed > limit:
            raise ValueError(
                f"the cache was made for max_cache_len={limit} tokens; {needed} do not fit: make it larger"
            )

    def _grow_host_store(self, needed: int, keys_like: torch.Tensor, values_like: torch.Tensor) -> None:
        """Room for `needed` tokens in the host K and V stores (rows like `keys_like[0]` and `values_like[0]`,
        each of its own width), within the cache's budget."""
        if needed <= self.host_keys.capacity:
            return
        self._check_room(needed)
        limit = self.owner.max_cache_len
        capacity = limit if limit is not None else max(needed, 2 * self.host_keys.capacity, 256)
        store_bytes = sum(host_store_bytes(capacity, t[0].numel() * t.element_size()) for t in (keys_like, values_like))
        self.owner.host_budget.reserve({self.layer_idx: store_bytes}, f"layer {self.layer_idx} at {capacity} tokens")
        host = torch.device("cpu")
        self.host_keys.reserve(capacity, keys_like, host)
        self.host_values.reserve(capacity, values_like, host)


class HostStoredCache:
    """What a cache of HostStoredLayers shares: the list of those layers and host memory reservation.

    Mixed into a DynamicCache that sets `max_cache_len` and `host_budget` (a HostMemoryBudget).
    """

    layers: list
    host_budget: HostMemoryBudget

    # transformers 5.17's Cache has a read-only (deprecated) `max_cache_len` property; ours is plain data.
    @property
    def max_cache_len(self) -> Optional[int]:
        """The preallocated length in tokens, or None when the host store grows."""
        return self.__dict__.get("_host_max_cache_len")

    @max_cache_len.setter
    def max_cache_len(self, value: Optional[int]) -> None:
        self.__dict__["_host_max_cache_len"] = value

    def offload_layers(self) -> list[HostStoredLayer]:
        """The layers whose K/V live in host memory, in order."""
        return [layer for layer in self.layers if isinstance(layer, HostStoredLayer)]

    def reserve_host_memory(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """With a preallocated length, reserve (and check) host memory for every layer at once."""
        if self.max_cache_len is None:
            return
        batch, heads, _, head_dim = key_states.shape
        per_layer = host_kv_bytes(
            1, batch, heads, head_dim, self.max_cache_len, key_states.dtype, value_dim=value_states.shape[-1]
        )
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

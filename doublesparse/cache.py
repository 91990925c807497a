"""The label cache: a transformers `Cache` whose Double Sparsity layers also keep compact labels.

`LabelCacheLayer.update` appends the new post-RoPE keys and values like `DynamicLayer` and, beside
them, the labels of the new keys (their r chosen channels, fp16/bf16, int8 or packed int4). Crop,
beam reorder and batch selection keep keys, values and labels in step.

`StaticLabelLayer` is the preallocated form (transformers' `StaticLayer` conventions): fixed
buffers written in place at the cache position, so a decode step allocates nothing, reads no value
back to the host, and can be compiled and captured in a CUDA graph.

Both are `SparseLayer`s: they run their layer's attention step (label_attention.py) with what they
hold, so the attention function needs to know nothing about them.

Multi-head latent attention (DeepSeek-V2/V3 as transformers implements it) caches the compressed latents,
not keys: `update` receives the latent and the shared RoPE key, and the attention module expands the
whole cache into per-head keys and values before each attention call. Labels must be made of those
keys, so such layers (`labels_from_attention=True`) label, in `attend`, the keys of the tokens `update`
stored since the last call.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from .huge_pages import huge_page_zeros
from .kernels.dispatch import make_labels, resolve_backend
from .kernels.label_append import Labels
from .kernels.scratch import Scratch
from .label_attention import attend_over_labels
from .plan import LayerPlan
from .step import AttentionCall, SparseLayer


class LabelCacheLayer(SparseLayer, DynamicLayer):
    """A dynamic KV layer that also stores the labels of its keys."""

    def __init__(
        self, channels: torch.Tensor, label_bits: int, backend: str = "auto", labels_from_attention: bool = False
    ) -> None:
        super().__init__()
        self.channels = channels
        self.label_bits = label_bits
        self.backend = backend
        self.labels_from_attention = labels_from_attention
        self._label_backend: Optional[str] = None
        self.labels: Optional[Labels] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append keys, values and the new keys' labels; return the whole keys and values."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not self.labels_from_attention:
            self._append_labels(key_states)
        return keys, values

    def attend(self, call: AttentionCall, plan: LayerPlan) -> tuple[torch.Tensor, None]:
        """The Double Sparsity step over this layer's keys, scored from its labels."""
        if self.labels_from_attention:
            # The call's keys are the expanded cache, oldest first: label those not labelled yet.
            labelled = 0 if self.labels is None else self.labels.codes.shape[2]
            if call.key.shape[2] > labelled:
                self._append_labels(call.key[:, :, labelled:])
        return attend_over_labels(call, plan, self.labels)

    def _append_labels(self, new_keys: torch.Tensor) -> None:
        if self._label_backend is None or self.channels.device != new_keys.device:
            self.channels = self.channels.to(new_keys.device)
            self._label_backend = resolve_backend(self.backend, new_keys.device)  # once, on the keys' device
        with torch.no_grad():  # labels only score tokens for the selection
            new = make_labels(new_keys, self.channels, self.label_bits, self._label_backend)
        self.labels = new if self.labels is None else Labels(*(_cat(a, b) for a, b in zip(self.labels, new)))

    def _map_labels(self, fn) -> None:
        if self.labels is not None:
            self.labels = Labels(*(None if t is None else fn(t) for t in self.labels))

    def reset(self) -> None:
        """Drop keys, values and labels."""
        super().reset()
        self.labels = None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (a negative count, as DynamicLayer.crop takes)."""
        super().crop(tokens_to_remove)
        if self.labels_from_attention:
            # Labels may lag the stored tokens (made at the next attention call): keep those of kept tokens.
            kept = self.get_seq_length()
            self._map_labels(lambda t: t[:, :, :kept])
        elif tokens_to_remove < 0:
            self._map_labels(lambda t: t[:, :, :tokens_to_remove])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        super().reorder_cache(beam_idx)
        self._map_labels(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times."""
        super().batch_repeat_interleave(repeats)
        self._map_labels(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows in `indices`."""
        super().batch_select_indices(indices)
        self._map_labels(lambda t: t[indices, ...])

    def memory(self) -> dict[str, int]:
        """Bytes held by keys, values and labels (scales and offsets included)."""
        report = {"keys": _nbytes(self.keys), "values": _nbytes(self.values), "labels": 0}
        if self.labels is not None:
            report["labels"] = sum(_nbytes(t) for t in self.labels)
        return report


def _cat(old: Optional[torch.Tensor], new: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if old is None else torch.cat([old, new], dim=2)


def _nbytes(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class DoubleSparseCache(DynamicCache):
    """A DynamicCache whose Double Sparsity layers keep labels; other layers are transformers' own.

    Build it with `doublesparse.make_cache(model)`; a patched model also makes one by itself when it
    is called with no cache or with an empty one (as `generate` does).
    """

    def __init__(
        self,
        model_config: Any,
        layer_channels: dict[int, torch.Tensor],
        label_bits: int,
        backend: str = "auto",
        labels_from_attention: bool = False,
    ):
        # transformers picks each layer's kind (full, sliding, chunked) from the config; only full
        # attention layers that Double Sparsity serves are swapped for label layers.
        super().__init__(config=model_config)
        for index, channels in layer_channels.items():
            if type(self.layers[index]) is not DynamicLayer:
                raise ValueError(
                    f"layer {index} is a {type(self.layers[index]).__name__}; only full-attention layers get labels"
                )
            self.layers[index] = LabelCacheLayer(channels, label_bits, backend, labels_from_attention)

    def labels(self, layer_idx: int) -> Optional[Labels]:
        """The labels of layer `layer_idx`, or None where that layer keeps none."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return getattr(layer, "labels", None)

    def memory(self) -> dict[str, int]:
        """Bytes held by keys, values and labels over all layers, and their total."""
        report = {"keys": 0, "values": 0, "labels": 0}
        for layer in self.layers:
            if hasattr(layer, "memory"):
                part = layer.memory()
            else:
                part = {
                    "keys": _nbytes(getattr(layer, "keys", None)),
                    "values": _nbytes(getattr(layer, "values", None)),
                }
            for name, value in part.items():
                report[name] += value
        report["total"] = report["keys"] + report["values"] + report["labels"]
        return report


class StaticLabelLayer(SparseLayer, StaticLayer):
    """A preallocated KV layer that also stores labels, all written in place."""

    def __init__(
        self,
        max_cache_len: int,
        channels: torch.Tensor,
        label_bits: int,
        backend: str = "auto",
        scratch: Optional[Scratch] = None,
        labels_from_attention: bool = False,
    ) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.channels = channels
        self.label_bits = label_bits
        self.backend = backend
        self.labels_from_attention = labels_from_attention
        self._label_backend: Optional[str] = None
        self.labels: Optional[Labels] = None
        # With labels_from_attention: the positions `update` wrote that no attention call has labelled yet.
        self._unlabelled: Optional[torch.Tensor] = None
        # Temporaries of the torch decode path, shared by the cache's layers (they run one after another).
        self.scratch = scratch if scratch is not None else Scratch()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate keys, values and label buffers for `max_cache_len` tokens."""
        super().lazy_initialization(key_states, value_states)
        kv_on_huge_pages(self)
        self.channels = self.channels.to(self.device)
        self._label_backend = resolve_backend(self.backend, self.device)  # once, on the buffers' device
        if not self.labels_from_attention:  # otherwise sized from the first attention call's keys
            self._allocate_labels(key_states)

    def _allocate_labels(self, keys: torch.Tensor) -> None:
        # Shapes and dtypes of one token's labels, taken from the label op itself.
        sample = make_labels(keys[:, :, :1], self.channels, self.label_bits, self._label_backend)
        self.labels = Labels(
            *(
                None if t is None else _zeros((*t.shape[:2], self.max_cache_len, *t.shape[3:]), t.dtype, self.device)
                for t in sample
            )
        )
        if not torch.compiler.is_compiling():
            for buffer in self.labels:
                if buffer is not None:
                    torch._dynamo.mark_static_address(buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write keys, values and labels at the next positions; return the whole buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.labels_from_attention:
            pending = self._unlabelled
            self._unlabelled = positions if pending is None else torch.cat([pending, positions])
        else:
            self._write_labels(key_states, positions)
        return keys, values

    def _write_labels(self, new_keys: torch.Tensor, positions: torch.Tensor) -> None:
        with torch.no_grad():  # labels only score tokens for the selection
            new = make_labels(new_keys, self.channels, self.label_bits, self._label_backend)
            for buffer, part in zip(self.labels, new):
                if buffer is not None:
                    buffer.index_copy_(2, positions, part)

    def attend(self, call: AttentionCall, plan: LayerPlan) -> tuple[torch.Tensor, None]:
        """The Double Sparsity step over the preallocated buffers: fixed slots, temporaries from the scratch."""
        if self.labels_from_attention and self._unlabelled is not None:
            # The call's keys are the whole expanded buffer: label the positions written since the last call.
            if self.labels is None:
                self._allocate_labels(call.key)
            self._write_labels(call.key.index_select(2, self._unlabelled), self._unlabelled)
            self._unlabelled = None
        return attend_over_labels(call, plan, self.labels, self.cumulative_length, self.scratch)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search, in place."""
        if self.is_initialized:
            for buffer in (self.keys, self.values, *(self.labels or ())):
                if buffer is not None:
                    buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def reset(self) -> None:
        """Zero keys, values and labels, keeping the buffers."""
        super().reset()
        self._unlabelled = None
        if self.labels is not None:
            for buffer in self.labels:
                if buffer is not None:
                    buffer.zero_()

    def memory(self) -> dict[str, int]:
        """Bytes held by the preallocated keys, values and labels."""
        report = {"keys": _nbytes(self.keys), "values": _nbytes(self.values), "labels": 0}
        if self.labels is not None:
            report["labels"] = sum(_nbytes(t) for t in self.labels)
        return report


class StaticDoubleSparseCache(StaticCache):
    """A StaticCache whose Double Sparsity layers keep preallocated labels (`max_cache_len` tokens)."""

    def __init__(
        self,
        model_config: Any,
        max_cache_len: int,
        layer_channels: dict[int, torch.Tensor],
        label_bits: int,
        backend: str = "auto",
        labels_from_attention: bool = False,
    ):
        super().__init__(config=model_config, max_cache_len=max_cache_len)
        self.scratch = Scratch()
        for index, channels in layer_channels.items():
            if type(self.layers[index]) is not StaticLayer:
                raise ValueError(
                    f"layer {index} is a {type(self.layers[index]).__name__}; only full-attention layers get labels"
                )
            self.layers[index] = StaticLabelLayer(
                max_cache_len, channels, label_bits, backend, self.scratch, labels_from_attention
            )

    labels = DoubleSparseCache.labels
    memory = DoubleSparseCache.memory


def kv_on_huge_pages(layer: StaticLayer) -> None:
    """Give an initialized CPU `StaticLayer` fresh zero keys and values on huge pages (huge_pages.py).

    Decode reads rows of them at random, and on huge pages those reads cost no TLB misses. Meant for a
    layer that holds nothing yet (transformers zeroes the buffers it allocates; these replace them).
    """
    if layer.keys.device.type != "cpu":
        return
    layer.keys = huge_page_zeros(tuple(layer.keys.shape), layer.keys.dtype)
    layer.values = huge_page_zeros(tuple(layer.values.shape), layer.values.dtype)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return huge_page_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)


def is_empty_cache(cache: Cache) -> bool:
    """Whether `cache` holds no tokens yet (so it can be swapped for a label cache)."""
    return all(int(layer.get_seq_length()) == 0 for layer in cache.layers if hasattr(layer, "get_seq_length"))

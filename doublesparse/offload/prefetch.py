"""Next-layer prefetch: layer i predicts layer i+1's selection and copies its rows while layer i computes.

A forward pre-hook on decoder layer i predicts layer i+1's query from layer i's input hidden states
(layer i+1's input norm, q projection, q-norm where the model has one, and RoPE at the current
position), scores it against layer i+1's labels and selects; the selected rows are copied on a side
stream of the cache (one per CUDA device, no module-level streams), ordered by CUDA events, into one of two
ring buffers of that device. Layer i+1 may sit on another device than layer i (device_map): its inputs move there.
Layers in the sync set select with their own query and copy synchronously: layer 0 always (nothing
precedes it), the configured `sync_layers`, or by default the layers whose recall (predicted host rows
found in the exact selection) over the first `prefetch_warmup_steps` decode steps of the cache is below
`prefetch_min_recall`. On CPU there are no streams: the same code runs with every copy done at once.
Sink tokens are forced into the host part of every selection, so the guarantee "current, recent and
sink tokens are always attended" holds with prediction as well.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..kernels.dispatch import label_scores
from ..kernels.label_projection import query_labels
from ..plan import LayerPlan
from ..policy import valid_keys
from ..support import module_device
from .cache import OffloadCache, OffloadLayer
from .host_store import gather_rows
from .selection import HostSelection, selection_recall, step_selection

logger = logging.getLogger(__name__)


@dataclass
class QueryPredictor:
    """Layer j's post-RoPE query computed from hidden states: its input norm, q projection, q-norm, RoPE."""

    norm: torch.nn.Module
    attention: torch.nn.Module
    rotate: Callable
    num_heads: int
    head_dim: int
    scaling: float
    device: Optional[torch.device] = None  # where layer j computes (its inputs are moved there first)

    def __call__(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
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


def query_predictors(
    model: torch.nn.Module, attention_modules: list[torch.nn.Module]
) -> dict[int, tuple[torch.nn.Module, QueryPredictor]]:
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
                f"{type(model).__name__} layer {index}: "
                "prefetch predicts the next layer's query from a decoder layer with "
                "`self_attn` (with q_proj or qkv_proj), `input_layernorm` and its module's `apply_rotary_pos_emb`, "
                "and this model lacks one of them: use SparsityConfig(offload=True, prefetch=False)"
            )
        fused = getattr(attention, "qkv_proj", None)
        if getattr(attention, "q_proj", None) is None and type(fused.weight).__name__ == "DTensor":
            raise ValueError(
                f"{type(model).__name__} layer {index}: prefetch slices the query rows out of the fused qkv "
                "projection's weight, which tensor parallelism has split over the ranks: use "
                "SparsityConfig(offload=True, prefetch=False)"
            )
        text = (
            attention.config.get_text_config(decoder=True)
            if hasattr(attention.config, "get_text_config")
            else attention.config
        )
        head_dim = attention.head_dim
        found[index] = (
            decoder_layer,
            QueryPredictor(
                norm,
                attention,
                rotate,
                text.num_attention_heads,
                head_dim,
                getattr(attention, "scaling", head_dim**-0.5),
                module_device(attention),
            ),
        )
    return found


def install_prefetch_hooks(
    predictors: dict[int, tuple[torch.nn.Module, QueryPredictor]],
    plans: dict[int, LayerPlan],
    sliding_layers: tuple[int, ...] = (),
) -> list[Any]:
    """A forward pre-hook on every decoder layer i that starts the prefetch of layer i+1; returns the handles.

    A sliding-window layer i prefetches nothing: its attention mask and position embeddings are those of its
    own kind (Gemma2, Gemma3 and gpt-oss alternate), not of the full-attention layer i+1, which therefore
    selects with its own query.
    """
    handles = []
    for index in sorted(predictors):
        following = index + 1
        target = predictors.get(following)
        plan = plans.get(following)
        decoder_layer = predictors[index][0]
        if target is None or plan is None or plan.dense or index in sliding_layers:
            handles.append(decoder_layer.register_forward_pre_hook(_step_counter(index), with_kwargs=True))
            continue
        handles.append(
            decoder_layer.register_forward_pre_hook(_prefetch_hook(index, following, target[1], plan), with_kwargs=True)
        )
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
            cache.prefetcher.prefetch(
                following, hidden, kwargs.get("position_embeddings"), kwargs.get("attention_mask"), predictor, plan
            )
        return None

    return prefetch_next_layer


@dataclass
class PendingPrefetch:
    """A selection made for layer `layer_idx` at key length `length`, and where its rows are being copied."""

    layer_idx: int
    length: int
    selection: HostSelection
    slot: Optional[int] = None
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    device: Optional[torch.device] = None  # the device whose ring slot `slot` holds the rows


@dataclass
class CopyStream:
    """One CUDA device's side stream for prefetch copies and the events of its two ring slots."""

    stream: Any
    ready: list[Any]
    consumed: list[Any]


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
        self.pending: dict[int, PendingPrefetch] = {}
        self.recall: dict[int, RecallTally] = {}
        self.predicted_layers: set[int] = set()
        self.chosen_sync: Optional[set[int]] = None
        # One side stream per CUDA device the layers sit on (a model split over devices has several).
        self.copy_streams: dict[torch.device, CopyStream] = {}

    # -- decisions --------------------------------------------------------------------------------

    def begin_step(self, hidden: torch.Tensor) -> None:
        """Count a decode step (called at the first decoder layer)."""
        if hidden is None or hidden.shape[1] != 1 or not any(layer.length for layer in self.cache.offload_layers()):
            return
        self.decode_steps += 1
        self.pending.clear()
        if (
            self.config.sync_layers is None
            and self.chosen_sync is None
            and self.decode_steps > self.config.prefetch_warmup_steps
        ):
            self.chosen_sync = {
                i
                for i in self.predicted_layers
                if not self.recall.get(i) or self.recall[i].mean < self.config.prefetch_min_recall
            }
            if self.recall:
                logger.info(
                    "doublesparse offload: layers copying synchronously after the warm-up: %s", sorted(self.chosen_sync)
                )

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

    def prefetch(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        position_embeddings,
        attention_mask,
        predictor: QueryPredictor,
        plan: LayerPlan,
    ) -> None:
        """At the start of layer layer_idx-1: predict layer `layer_idx`'s selection and start copying its rows."""
        layer = self.cache.layers[layer_idx]
        if (
            not isinstance(layer, OffloadLayer)
            or not layer.length
            or hidden.shape[1] != 1
            or position_embeddings is None
        ):
            return
        self.predicted_layers.add(layer_idx)
        use, measure = self.uses_prediction(layer_idx), self.measures(layer_idx)
        if not (use or measure):
            return
        length = layer.length + 1  # the current token joins the layer in its own attention call
        device = predictor.device or hidden.device
        if hidden.device != device:
            # Layer i and layer i+1 sit on different devices (a model split by device_map).
            hidden = hidden.to(device, non_blocking=True)
            position_embeddings = tuple(t.to(device, non_blocking=True) for t in position_embeddings)
            if isinstance(attention_mask, torch.Tensor):
                attention_mask = attention_mask.to(device, non_blocking=True)
        query = predictor(hidden, position_embeddings)
        valid = valid_keys(attention_mask, hidden.shape[0], 1, length, hidden.device)
        scores = label_scores(
            query_labels(query, plan.channels_on(query.device)),
            layer.labels,
            self.config.label_bits,
            predictor.scaling,
            plan.num_select_heads,
            plan.backend_on(query.device),
        )
        window = min(layer.window_size, length)
        selection = step_selection(scores, valid, self.config, length, window)
        pending = PendingPrefetch(layer_idx, length, selection)
        if use:
            self._start_copy(layer, pending, window)
        self.pending[layer_idx] = pending

    def take(self, layer_idx: int, length: int) -> Optional[PendingPrefetch]:
        """The prediction made for this layer and step, if any (its copy waited for on the device)."""
        pending = self.pending.pop(layer_idx, None)
        if pending is None or pending.length != length:
            return None
        copy = self.copy_streams.get(pending.device) if pending.slot is not None else None
        if copy is not None:
            torch.cuda.current_stream(pending.device).wait_event(copy.ready[pending.slot])
        return pending

    def release(self, pending: PendingPrefetch) -> None:
        """Mark the ring slot of `pending` free once the attention reading it has run."""
        copy = self.copy_streams.get(pending.device) if pending.slot is not None else None
        if copy is not None:
            copy.consumed[pending.slot].record(torch.cuda.current_stream(pending.device))

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
            "sync_rule": "configured"
            if self.config.sync_layers is not None
            else f"recall < {self.config.prefetch_min_recall} over {self.config.prefetch_warmup_steps} warm-up steps",
        }

    def _start_copy(self, layer: OffloadLayer, pending: PendingPrefetch, window: int) -> None:
        selection = pending.selection
        batch, num_select, _, host_slots = selection.indices.shape
        keys_store, values_store = layer.host_store()
        heads, head_dim = keys_store.shape[2], keys_store.shape[3]
        shape = (batch, heads, window + (num_select // heads) * host_slots, head_dim)
        cuda = layer.device.type == "cuda"
        copy = self._copy_stream(layer.device) if cuda else None
        slot, keys, values = self.cache.buffers_for(layer.device).ring_views(
            shape,
            keys_store.dtype,
            layer.device,
            before_realloc=copy.stream.synchronize if cuda else (lambda: None),
            value_dim=values_store.shape[3],
        )
        pending.slot, pending.keys, pending.values, pending.device = slot, keys, values, layer.device
        indices = selection.indices.reshape(batch, heads, -1)
        if not cuda:
            gather_rows(keys_store, indices, keys[:, :, window:], layer.backend)
            gather_rows(values_store, indices, values[:, :, window:], layer.backend)
            return
        selected = torch.cuda.Event()
        selected.record(torch.cuda.current_stream(layer.device))
        with torch.cuda.stream(copy.stream):
            copy.stream.wait_event(selected)
            copy.stream.wait_event(copy.consumed[slot])
            indices.record_stream(copy.stream)
            gather_rows(keys_store, indices, keys[:, :, window:], layer.backend)
            gather_rows(values_store, indices, values[:, :, window:], layer.backend)
            copy.ready[slot].record(copy.stream)

    def _copy_stream(self, device: torch.device) -> CopyStream:
        if device not in self.copy_streams:
            with torch.cuda.device(device):
                events = [[torch.cuda.Event(), torch.cuda.Event()] for _ in range(2)]
            self.copy_streams[device] = CopyStream(torch.cuda.Stream(device=device), *events)
        return self.copy_streams[device]

"""Patching stock transformers models: `apply`, `remove`, `patched` and `make_cache`.

Nothing of the model is copied or forked: `apply` patches the attention (attention_patch.py) with the
Double Sparsity function and each layer's `LayerPlan`, and adds forward pre-hooks: one on the decoder
that swaps an empty (or missing) cache for a label cache, one on each attention module that hands the
attention function its layer of that cache, and in offload mode with prefetching, one per decoder
layer that starts the next layer's copy. `remove` undoes exactly that. `make_cache` is the one
factory of label caches (growing, preallocated, offloaded).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .attention import ATTENTION_NAME, LAYER_KWARG, PLAN_ATTRIBUTE, double_sparse_attention
from .attention_patch import AttentionPatch, patch_attention
from .cache import DoubleSparseCache, StaticDoubleSparseCache, is_empty_cache
from .channels import ChannelMask
from .config import SparsityConfig
from .layout import HeadLayout
from .offload import OffloadCache, Prefetcher, host_kv_bytes, install_prefetch_hooks, query_predictors
from .plan import LayerPlan, layer_plans
from .step import SparseLayer
from .support import attention_modules, check_supported, module_device

logger = logging.getLogger(__name__)

STATE_ATTRIBUTE = "_doublesparse_state"
ChannelsLike = Union[ChannelMask, str, os.PathLike]
LabelCache = Union[DoubleSparseCache, StaticDoubleSparseCache, OffloadCache]


@dataclass
class PatchState:
    """What `apply` did to a model: its config, mask, layout and plans, and the attention patch to undo."""

    config: SparsityConfig
    channels: ChannelMask
    layout: HeadLayout
    plans: dict[int, LayerPlan]
    attention: Optional[AttentionPatch] = None


def apply(model: torch.nn.Module, channels: ChannelsLike, config: Optional[SparsityConfig] = None) -> torch.nn.Module:
    """Patch `model` in place to decode with Double Sparsity; return it.

    `channels` is a ChannelMask or a path to one (safetensors, or the authors' JSON).
    Everything is validated before the model is touched; on error nothing stays patched.
    """
    config = config or SparsityConfig()
    if not isinstance(config, SparsityConfig):
        raise ValueError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise ValueError("this model is already patched: call doublesparse.remove(model) first")
    layout = HeadLayout.from_config(model.config)
    check_supported(model, layout)
    mask = channels if isinstance(channels, ChannelMask) else ChannelMask.load(channels, layout=layout)
    mask.validate(layout)
    config.check_model(layout.num_layers, layout.head_dim)
    modules = attention_modules(model, layout)
    # The kernel backend of every layer is resolved here, once, for the device the layer sits on.
    plans = layer_plans(mask, config, layout, {module.layer_idx: module_device(module) for module in modules})
    predictors = query_predictors(model, modules) if config.prefetch else None  # validates before patching
    if layout.sliding_layers:
        logger.warning("doublesparse: sliding-window layers %s stay dense", list(layout.sliding_layers))

    def add_hooks(patch: AttentionPatch) -> None:
        for module in modules:
            patch.hooks.append(module.register_forward_pre_hook(_hand_layer_to_attention, with_kwargs=True))
        if predictors is not None:
            patch.hooks.extend(install_prefetch_hooks(predictors, plans))
        patch.hooks.append(_decoder(model).register_forward_pre_hook(_label_cache_hook(model), with_kwargs=True))

    state = PatchState(config, mask, layout, plans)
    setattr(model, STATE_ATTRIBUTE, state)
    try:
        per_module = {module: plans[module.layer_idx] for module in modules}
        state.attention = patch_attention(
            model, ATTENTION_NAME, double_sparse_attention, PLAN_ATTRIBUTE, per_module, add_hooks
        )
    except BaseException:
        delattr(model, STATE_ATTRIBUTE)
        raise
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`: the model computes exactly what it computed before; return it."""
    state: Optional[PatchState] = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        return model
    if state.attention is not None:
        state.attention.restore()
    delattr(model, STATE_ATTRIBUTE)
    return model


@contextlib.contextmanager
def patched(
    model: torch.nn.Module, channels: ChannelsLike, config: Optional[SparsityConfig] = None
) -> Iterator[torch.nn.Module]:
    """Context-manager form of `apply`: the model is restored on exit."""
    apply(model, channels, config)
    try:
        yield model
    finally:
        remove(model)


def patch_state(model: torch.nn.Module) -> PatchState:
    """The patch state of a patched model; ValueError if it is not patched."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("this model is not patched: call doublesparse.apply(model, channels, config) first")
    return state


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `apply` patched this model (and `remove` has not undone it)."""
    return getattr(model, STATE_ATTRIBUTE, None) is not None


def make_cache(
    model: torch.nn.Module,
    max_cache_len: Optional[int] = None,
    *,
    batch_size: Optional[int] = None,
    measure_recall: bool = False,
) -> LabelCache:
    """An empty label cache for a patched model: growing, or preallocated for `max_cache_len` tokens.

    The preallocated (static) cache makes a decode step allocation- and sync-free, for
    `torch.compile` and CUDA graphs; `generate(..., cache_implementation="static")` gets one too.
    In offload mode it is an `OffloadCache`: with `max_cache_len` and `batch_size` the host memory it
    needs is checked now; `measure_recall` makes its prefetcher measure recall at every step.
    """
    state = patch_state(model)
    config = state.config
    for name, value in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if measure_recall and not config.prefetch:
        raise ValueError("measure_recall measures the prefetch: patch with SparsityConfig(offload=True, prefetch=True)")
    if batch_size is not None and not config.offload:
        raise ValueError("batch_size sizes the host memory of offload caches: patch with SparsityConfig(offload=True)")
    layer_channels = {i: plan.channels for i, plan in state.plans.items() if not plan.dense}
    if config.offload:
        return _offload_cache(model, state, layer_channels, max_cache_len, batch_size, measure_recall)
    if max_cache_len is None:
        return DoubleSparseCache(model.config, layer_channels, config.label_bits, config.backend)
    return StaticDoubleSparseCache(model.config, max_cache_len, layer_channels, config.label_bits, config.backend)


def _offload_cache(
    model: torch.nn.Module,
    state: PatchState,
    layer_channels: dict[int, torch.Tensor],
    max_cache_len: Optional[int],
    batch_size: Optional[int],
    measure_recall: bool,
) -> OffloadCache:
    cache = OffloadCache(model.config, layer_channels, state.config, max_cache_len)
    if state.config.prefetch:
        cache.prefetcher = Prefetcher(cache, measure_recall)
    if max_cache_len is not None and batch_size is not None:
        layout = state.layout
        dtype = next(model.parameters()).dtype
        per_layer = host_kv_bytes(1, batch_size, layout.num_kv_heads, layout.head_dim, max_cache_len, dtype)
        cache.host_budget.reserve(
            {i: per_layer for i in layer_channels},
            f"{len(layer_channels)} layers x batch {batch_size} x {max_cache_len} tokens",
        )
    return cache


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


OFFLOAD_CACHE_NEEDED = (
    "SparsityConfig(offload=True) needs the offload cache: pass no cache, an empty DynamicCache or "
    "doublesparse.make_cache(model)"
)


def _label_cache_hook(model: torch.nn.Module):
    def swap_in_label_cache(module: torch.nn.Module, args: tuple, kwargs: dict):
        offload = patch_state(model).config.offload
        cache = kwargs.get("past_key_values")
        if isinstance(cache, (DoubleSparseCache, StaticDoubleSparseCache)):
            if offload and not isinstance(cache, OffloadCache):
                raise ValueError(OFFLOAD_CACHE_NEEDED)
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if cache is None and not use_cache:
            if offload:
                raise ValueError(OFFLOAD_CACHE_NEEDED)
            return None
        if cache is None or (type(cache) is DynamicCache and is_empty_cache(cache)):
            kwargs["past_key_values"] = make_cache(model)
            return args, kwargs
        if type(cache) is StaticCache and is_empty_cache(cache):
            kwargs["past_key_values"] = make_cache(model, cache.get_max_length())
            return args, kwargs
        if isinstance(cache, Cache):
            raise ValueError(
                f"doublesparse needs its label cache, got a {type(cache).__name__} that it cannot fill: pass no cache, "
                "an empty DynamicCache, or doublesparse.make_cache(model)"
            )
        return None

    return swap_in_label_cache


def _hand_layer_to_attention(module: torch.nn.Module, args: tuple, kwargs: dict):
    # The attention module does not pass the cache on to the attention function: hand it the layer.
    cache = kwargs.get("past_key_values")
    layers = cache.layers if isinstance(cache, Cache) else ()
    layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
    kwargs[LAYER_KWARG] = layer if isinstance(layer, SparseLayer) else None
    return args, kwargs

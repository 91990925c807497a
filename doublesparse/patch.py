"""Patching stock transformers models: `apply`, `remove`, `patched` and `make_cache`.

Nothing of the model is copied or forked: `apply` registers one attention function with
transformers' attention interface, switches the model to it, gives each attention module its
`LayerPlan`, and adds two forward pre-hooks: one on the decoder that swaps an empty (or missing)
cache for a label cache, one on each attention module that hands that cache to the attention
function. `remove` undoes exactly that.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import sdpa_mask

from . import offload
from .attention import ATTENTION_NAME, CACHE_KWARG, PLAN_ATTRIBUTE, LayerPlan, double_sparse_attention
from .cache import DoubleSparseCache, StaticDoubleSparseCache, is_empty_cache
from .channels import ChannelMask
from .config import SparsityConfig
from .layout import HeadLayout

logger = logging.getLogger(__name__)

STATE_ATTRIBUTE = "_doublesparse_state"
ChannelsLike = Union[ChannelMask, str, os.PathLike]


@dataclass
class PatchState:
    """What `apply` changed on a model, so that `remove` can undo it."""

    config: SparsityConfig
    channels: ChannelMask
    layout: HeadLayout
    plans: dict[int, LayerPlan]
    previous_attention: Optional[str]
    modules: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)


def register_attention() -> None:
    """Register the attention function and its mask with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, double_sparse_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module, layout: HeadLayout) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order; ValueError if not found."""
    found: dict[int, torch.nn.Module] = {}
    for _, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        is_attention = any(hasattr(module, p) for p in ("q_proj", "qkv_proj")) and hasattr(module, "config")
        if isinstance(index, int) and is_attention:
            if index in found:
                raise ValueError(f"{type(model).__name__} has two attention modules for layer {index}: not supported")
            found[index] = module
    if sorted(found) != list(range(layout.num_layers)):
        raise ValueError(
            f"{type(model).__name__}: found attention modules for layers {sorted(found)}, expected 0..{layout.num_layers - 1}; "
            "doublesparse serves decoder models whose attention goes through transformers' attention interface"
        )
    return [found[i] for i in range(layout.num_layers)]


def check_supported(model: torch.nn.Module, layout: HeadLayout) -> None:
    """Raise ValueError for a model that Double Sparsity cannot serve."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' attention interface, "
            "so doublesparse cannot patch it"
        )
    text = model.config.get_text_config(decoder=True)
    for name in ("attn_logit_softcapping",):
        if getattr(text, name, None) is not None:
            raise ValueError(f"{type(model).__name__} uses {name}, which doublesparse does not implement")
    if layout.num_heads % layout.num_kv_heads:
        raise ValueError(f"{layout.num_heads} query heads do not split into {layout.num_kv_heads} KV groups")


def layer_plans(mask: ChannelMask, config: SparsityConfig, layout: HeadLayout) -> dict[int, LayerPlan]:
    """One plan per layer: label channels and selection heads, or dense."""
    if config.selection == "group":
        mask = mask.per_kv()
        num_select_heads = layout.num_kv_heads
    else:
        num_select_heads = layout.num_heads
    top = mask.top(config.num_channels)
    plans = {}
    for layer in range(layout.num_layers):
        dense = layer in config.dense_layers or layer in layout.sliding_layers
        plans[layer] = LayerPlan(layer, config, None if dense else top[layer].clone(), num_select_heads, dense)
    return plans


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
    plans = layer_plans(mask, config, layout)
    predictors = offload.query_predictors(model, modules) if config.prefetch else None  # validates before patching
    if layout.sliding_layers:
        logger.warning("doublesparse: sliding-window layers %s stay dense", list(layout.sliding_layers))

    register_attention()
    state = PatchState(config, mask, layout, plans, model.config._attn_implementation)
    setattr(model, STATE_ATTRIBUTE, state)
    try:
        for module in modules:
            setattr(module, PLAN_ATTRIBUTE, plans[module.layer_idx])
            state.modules.append(module)
            state.hooks.append(module.register_forward_pre_hook(_hand_cache_to_attention, with_kwargs=True))
        if predictors is not None:
            state.hooks.extend(offload.install_prefetch_hooks(predictors, plans))
        decoder = _decoder(model)
        state.hooks.append(decoder.register_forward_pre_hook(_label_cache_hook(model), with_kwargs=True))
        model.set_attn_implementation(ATTENTION_NAME)
    except BaseException:
        remove(model)
        raise
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`: the model computes exactly what it computed before; return it."""
    state: Optional[PatchState] = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    for module in state.modules:
        if hasattr(module, PLAN_ATTRIBUTE):
            delattr(module, PLAN_ATTRIBUTE)
    if model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(state.previous_attention or "sdpa")
    delattr(model, STATE_ATTRIBUTE)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, channels: ChannelsLike, config: Optional[SparsityConfig] = None) -> Iterator[torch.nn.Module]:
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


def make_cache(model: torch.nn.Module, max_cache_len: Optional[int] = None) -> Union[DoubleSparseCache, StaticDoubleSparseCache]:
    """An empty label cache for a patched model: dynamic, or preallocated for `max_cache_len` tokens.

    The preallocated (static) cache makes a decode step allocation- and sync-free, for
    `torch.compile` and CUDA graphs; `generate(..., cache_implementation="static")` gets one too.
    """
    state = patch_state(model)
    layer_channels = {i: plan.channels for i, plan in state.plans.items() if not plan.dense}
    bits, backend = state.config.label_bits, state.config.backend
    if state.config.offload:  # Double Sparsity-Offload (doublesparse/offload.py); validates max_cache_len
        from .offload import make_offload_cache

        return make_offload_cache(model, max_cache_len)
    if max_cache_len is None:
        return DoubleSparseCache(model.config, layer_channels, bits, backend)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
    return StaticDoubleSparseCache(model.config, max_cache_len, layer_channels, bits, backend)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _label_cache_hook(model: torch.nn.Module):
    def swap_in_label_cache(module: torch.nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, (DoubleSparseCache, StaticDoubleSparseCache)):
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if cache is None and not use_cache:
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


def _hand_cache_to_attention(module: torch.nn.Module, args: tuple, kwargs: dict):
    kwargs[CACHE_KWARG] = kwargs.get("past_key_values")
    return args, kwargs

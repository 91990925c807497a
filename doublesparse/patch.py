"""Patching stock transformers models: `apply`, `remove`, `patched` and `make_cache`.

Nothing of the model is copied or forked: `apply` patches the attention (attention_patch.py) with the
Double Sparsity function and each layer's `LayerPlan`, and adds forward pre-hooks: one on the decoder
that swaps an empty (or missing) cache for a label cache, one on each attention module that hands the
attention function its layer of that cache, and in offload mode with prefetching, one per decoder
layer that starts the next layer's copy. It also wraps the model's `generate` to tell the attention
the prompt's length: assisted decoding's first target forward holds the prompt and the first draft
tokens with no past, and the draft rows must select like decode steps, not attend densely as a
prefill does. `remove` undoes exactly that. `make_cache` is the one factory of label caches
(growing, preallocated, offloaded).

A model switched to another attention implementation after `apply` (`set_attn_implementation`) would
run dense: its next forward, `patch_state` and `make_cache` raise ValueError saying what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .attention import ATTENTION_NAME, LAYER_KWARG, PLAN_ATTRIBUTE, PROMPT_KWARG, double_sparse_attention
from .attention_patch import AttentionPatch, patch_attention
from .cache import DoubleSparseCache, StaticDoubleSparseCache, is_empty_cache
from .channels import ChannelMask
from .config import SparsityConfig
from .layout import HeadLayout, is_mla, shape_fingerprint
from .offload import OffloadCache, Prefetcher, host_kv_bytes, install_prefetch_hooks, query_predictors
from .plan import LayerPlan, layer_plans
from .sharding import HeadShard, head_shards, local_layout
from .step import SparseLayer
from .support import check_supported, module_device

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
    shards: Optional[dict[int, HeadShard]] = None  # the heads this rank holds, under tensor parallelism
    # Set by the wrapped `generate` for the length of one call: the prompt's length.
    prompt_rows: Optional[int] = None

    def is_running(self) -> bool:
        """Whether the model still attends through the patch (not switched to another implementation since)."""
        return self.attention is None or self.attention.is_active()


def apply(model: torch.nn.Module, channels: ChannelsLike, config: Optional[SparsityConfig] = None) -> torch.nn.Module:
    """Patch `model` in place to decode with Double Sparsity; return it.

    `channels` is a ChannelMask or a path to one (safetensors, or the authors' JSON).
    Everything is validated before the model is touched; on error nothing stays patched.
    """
    config = SparsityConfig() if config is None else config
    if not isinstance(config, SparsityConfig):
        raise ValueError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if not isinstance(channels, (ChannelMask, str, os.PathLike)):
        raise ValueError(
            f"channels must be a ChannelMask or the path of a channel mask file (.safetensors or the authors' .json), "
            f"got {type(channels).__name__}: calibrate one with doublesparse calibrate, or load one with "
            "doublesparse.ChannelMask.load(path)"
        )
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(f"doublesparse patches a transformers model, got {type(model).__name__}")
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is not None:
        switched = "" if state.is_running() else f" (and since switched to {model.config._attn_implementation!r})"
        raise ValueError(f"this model is already patched{switched}: call doublesparse.remove(model) first")
    layout = HeadLayout.from_config(model.config)
    modules = check_supported(model, layout)
    if config.offload and is_mla(model.config):
        raise ValueError(
            f"{type(model).__name__} uses multi-head latent attention, which SparsityConfig(offload=True) does not "
            "serve: transformers caches the compressed latents and expands the whole cache into keys and values "
            "on the device before every attention call, so they cannot stay in host memory; use offload=False"
        )
    mask = channels if isinstance(channels, ChannelMask) else ChannelMask.load(channels, layout=layout)
    shards = head_shards(model, modules, layout)  # the heads this rank holds, under tensor parallelism
    mask = _mask_for_model(mask, layout, shape_fingerprint(model.config), shards)
    config.check_model(layout.num_layers, layout.head_dim)
    # The kernel backend of every layer is resolved here, once, for the device the layer sits on.
    devices = {module.layer_idx: module_device(module) for module in modules}
    plans = layer_plans(mask, config, layout, devices, shards)
    predictors = query_predictors(model, modules) if config.prefetch else None  # validates before patching
    if layout.sliding_layers:
        logger.warning("doublesparse: sliding-window layers %s stay dense", list(layout.sliding_layers))

    state = PatchState(config, mask, layout, plans, shards=shards)

    def add_hooks(patch: AttentionPatch) -> None:
        for module in modules:
            patch.hooks.append(module.register_forward_pre_hook(_attention_inputs_hook(state), with_kwargs=True))
        if predictors is not None:
            patch.hooks.extend(install_prefetch_hooks(predictors, plans, layout.sliding_layers))
        patch.hooks.append(_decoder(model).register_forward_pre_hook(_label_cache_hook(model), with_kwargs=True))
        if callable(getattr(model, "generate", None)):
            patch.hooks.append(_GenerateWrapper(model))

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


def _mask_for_model(
    mask: ChannelMask, layout: HeadLayout, fingerprint: str, shards: Optional[dict[int, HeadShard]]
) -> ChannelMask:
    """`mask.for_model(...)`; under tensor parallelism the error also names the rank and its heads."""
    try:
        return mask.for_model(layout, fingerprint)
    except ValueError as error:
        if not shards:
            raise
        shard = shards[min(shards)]
        raise ValueError(
            f"{shard.describe(layout)}. Pass the whole model's mask to every rank (each rank keeps its own heads' "
            f"rows): {error}"
        ) from error


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
    """The patch state of a patched model; ValueError if it is not patched, or no longer runs the patch."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("this model is not patched: call doublesparse.apply(model, channels, config) first")
    if not state.is_running():
        raise ValueError(_switched_away(model))
    return state


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `apply` patched this model and `remove` has not undone it.

    A model switched to another attention implementation since still counts (its hooks are there):
    `patch_state` and its forward then raise, saying to call `remove`.
    """
    return getattr(model, STATE_ATTRIBUTE, None) is not None


def _switched_away(model: torch.nn.Module) -> str:
    return (
        f"this model was patched by doublesparse.apply, then switched to attention implementation "
        f"{model.config._attn_implementation!r}, so it would attend densely, not with Double Sparsity: call "
        "doublesparse.remove(model) (and doublesparse.apply again to decode sparsely), or switch back with "
        f"model.set_attn_implementation({ATTENTION_NAME!r})"
    )


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
    # An MLA model caches latents, not keys: its label layers label the keys each attention call expands.
    latents = is_mla(model.config)
    if max_cache_len is None:
        return DoubleSparseCache(model.config, layer_channels, config.label_bits, config.backend, latents)
    return StaticDoubleSparseCache(
        model.config, max_cache_len, layer_channels, config.label_bits, config.backend, latents
    )


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
    if max_cache_len is not None:
        # Without a batch size, batch 1 is what any batch needs at least: a context that host memory
        # cannot hold even then is refused now, not at the prefill.
        batch = batch_size or 1
        layout = local_layout(state.layout, state.shards)
        dtype = next(model.parameters()).dtype
        per_layer = host_kv_bytes(
            1, batch, layout.num_kv_heads, layout.head_dim, max_cache_len, dtype, value_dim=layout.value_dim
        )
        sizes = {i: per_layer for i in layer_channels}
        what = f"{len(layer_channels)} layers x batch {batch} x {max_cache_len} tokens"
        if batch_size is None:
            cache.host_budget.check(sizes, what + " (batch 1, the least any batch needs)")
        else:
            cache.host_budget.reserve(sizes, what)
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
        offload = patch_state(model).config.offload  # raises if the model was switched to another attention
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


def _attention_inputs_hook(state: PatchState):
    def hand_over(module: torch.nn.Module, args: tuple, kwargs: dict):
        # The attention module does not pass the cache on to the attention function: hand it the layer,
        # and inside generate the prompt's length.
        cache = kwargs.get("past_key_values")
        layers = cache.layers if isinstance(cache, Cache) else ()
        layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
        kwargs[LAYER_KWARG] = layer if isinstance(layer, SparseLayer) else None
        kwargs[PROMPT_KWARG] = state.prompt_rows
        return args, kwargs

    return hand_over


class _GenerateWrapper:
    """The model's `generate`, telling the attention the prompt's length; `remove()` unwraps it.

    A callable object, not a closure, so that a deep copy of the patched model gets a wrapper of its
    own copy (a copied closure would still call the original model).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        functools.update_wrapper(self, model.generate)
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state: Optional[PatchState] = getattr(self.model, STATE_ATTRIBUTE, None)
        if state is None:
            return self.__wrapped__(*args, **kwargs)
        # Restored, not cleared: the model may be its own assistant, generating inside its generate.
        outer = state.prompt_rows
        state.prompt_rows = _prompt_rows(args, kwargs)
        try:
            return self.__wrapped__(*args, **kwargs)
        finally:
            state.prompt_rows = outer

    def remove(self) -> None:
        """Restore the model's own `generate`."""
        if self.model.__dict__.get("generate") is self:
            del self.model.generate


def _prompt_rows(args: tuple, kwargs: dict) -> int:
    # generate(inputs=None, ...): the prompt is `inputs`, `input_ids` or `inputs_embeds`; with none of
    # them generate starts from one BOS token.
    for prompt in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids")):
        if isinstance(prompt, torch.Tensor):
            return int(prompt.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return int(embeds.shape[1])
    return 1

"""Which models Double Sparsity can serve, and where their attention modules are.

The runtime, calibration capture and the evaluation baselines all patch the same modules, found the
same way: the module of each decoder layer that carries a `layer_idx`, a q (or fused qkv) projection
and the model config, which is how transformers' attention classes look.

What the attention function is handed is checked too. `UNDERSTOOD_ATTENTION_KWARGS` lists every
keyword argument transformers passes to an attention function that doublesparse understands, in one
place; `SERVED_ATTENTION_KWARGS` those it computes with (learned sinks `s_aux`, logit `softcap`),
checked by value at every call. Anything else (packed-sequence lengths, whatever a new model adds) is
refused by name, at every call, dense paths included. An argument passed as None is a feature the
model does not use, and is accepted. Verified against the calls of every architecture of the tested
matrix (architectures.py; forward, greedy, sampling, beam, static-cache and assisted generation,
training) in transformers 5.17 and 5.23 (tests/test_bad_input.py records them). A model whose type is
outside the matrix is served where its calls pass these checks, with a warning that names it untested.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import torch

from .architectures import TESTED, tested_architecture
from .layout import HeadLayout

logger = logging.getLogger(__name__)

# Model types already warned about as untested in this process: the note is given once.
_WARNED_UNTESTED: set[str] = set()

# Keyword arguments understood with any value, and why they do not change what doublesparse computes.
UNDERSTOOD_ATTENTION_KWARGS: dict[str, str] = {
    "position_ids": "RoPE is applied to q and k before the call; the cache orders the keys",
    "cache_position": "the cache placed the new keys before the call; selection reads the cache's own fill",
    "use_cache": "the cache update happened before the call",
    "output_hidden_states": "recorded by the decoder, not by attention",
    "output_router_logits": "recorded by the MoE blocks, not by attention",
    "num_items_in_batch": "used by the loss only",
    "sliding_window": "a call with a sliding window attends densely (the mask applies the window)",
}

# Keyword arguments understood only with these values (None: the model did not ask for the feature).
ATTENTION_KWARG_VALUES: dict[str, tuple[Any, ...]] = {
    "is_causal": (None, True),  # doublesparse selects among each row's past only
    "output_attentions": (None, False),  # no attention weights are computed
}

# Keyword arguments doublesparse computes with, checked by value at every call (`served_extras`).
SERVED_ATTENTION_KWARGS: dict[str, str] = {
    "s_aux": "learned attention sinks (gpt-oss): one logit per query head in every softmax denominator",
    "softcap": "attention logit softcapping (Gemma2): tanh(logits / softcap) * softcap before the softmax",
}

# What refused keyword arguments are, for the error message.
KNOWN_UNSUPPORTED = {
    "sinks": "attention sinks in a form other than gpt-oss's s_aux",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
    "max_length_q": "packed (varlen) sequences",
    "max_length_k": "packed (varlen) sequences",
    "seq_idx": "packed sequences",
    "is_causal": "non-causal (bidirectional) attention",
    "output_attentions": "returning attention weights",
}


# Attributes of an attention module that project the queries (alone, or fused with keys and values).
QUERY_PROJECTIONS = ("q_proj", "qkv_proj", "query_key_value")


def attention_modules(model: torch.nn.Module, layout: HeadLayout) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order; ValueError if not found."""
    found: dict[int, torch.nn.Module] = {}
    for _, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        is_attention = any(hasattr(module, p) for p in QUERY_PROJECTIONS) and hasattr(module, "config")
        if isinstance(index, int) and is_attention:
            if index in found:
                raise ValueError(f"{type(model).__name__} has two attention modules for layer {index}: not supported")
            found[index] = module
    if sorted(found) != list(range(layout.num_layers)):
        raise ValueError(
            f"{type(model).__name__}: found attention modules for layers {sorted(found)}, "
            f"expected 0..{layout.num_layers - 1}; doublesparse serves decoder models whose attention goes through "
            "transformers' attention interface"
        )
    return [found[i] for i in range(layout.num_layers)]


def check_supported(model: torch.nn.Module, layout: HeadLayout) -> list[torch.nn.Module]:
    """Raise ValueError for a model that Double Sparsity cannot serve; return its attention modules."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{name} does not route attention through transformers' attention interface, so doublesparse cannot "
            "patch it"
        )
    if layout.num_heads % layout.num_kv_heads:
        raise ValueError(f"{layout.num_heads} query heads do not split into {layout.num_kv_heads} KV groups")
    modules = attention_modules(model, layout)
    for module in modules:
        _check_attention_module(module)
    _note_untested(model)
    return modules


def _check_attention_module(module: torch.nn.Module) -> None:
    sinks = getattr(module, "sinks", None)
    if isinstance(sinks, torch.Tensor) and (sinks.dim() != 1 or not sinks.is_floating_point()):
        name = type(module).__name__
        raise ValueError(
            f"{name}.sinks is a {sinks.dtype} tensor of shape {tuple(sinks.shape)}: doublesparse serves learned "
            "sinks as gpt-oss has them, one float logit per query head"
        )


def _note_untested(model: torch.nn.Module) -> None:
    text = model.config.get_text_config(decoder=True)
    model_type = str(getattr(text, "model_type", ""))
    if tested_architecture(text) is not None or model_type in _WARNED_UNTESTED:
        return
    _WARNED_UNTESTED.add(model_type)
    logger.warning(
        "doublesparse: %s (model type %r) is not in the tested architecture matrix (%s): its attention calls pass "
        "doublesparse's checks, but its results have not been compared with the dense model; run "
        "tests/test_architectures.py's checks on it before trusting them (noted once per process)",
        type(model).__name__,
        model_type,
        ", ".join(sorted(TESTED)),
    )


def check_attention_kwargs(module: torch.nn.Module, kwargs: Mapping[str, Any], num_heads: Optional[int] = None) -> None:
    """Raise ValueError naming any keyword argument of an attention call that doublesparse does not understand.

    `num_heads` (the call's query heads) is what a served `s_aux` must have one logit for.
    """
    for key, value in kwargs.items():
        if key in UNDERSTOOD_ATTENTION_KWARGS:
            continue
        if value is None:  # the model passes the argument but does not use the feature
            continue
        if key in SERVED_ATTENTION_KWARGS:
            _check_served(module, key, value, num_heads)
            continue
        if _one_of(value, ATTENTION_KWARG_VALUES.get(key, ())):
            continue
        what = KNOWN_UNSUPPORTED.get(key, "an attention feature")
        raise ValueError(
            f"{type(module).__name__} passes {key}={_short(value)} ({what}) to the attention function, which "
            "doublesparse does not understand: its results would be silently wrong, so it refuses this model "
            "(remove the patch with doublesparse.remove(model))"
        )


def _check_served(module: torch.nn.Module, key: str, value: Any, num_heads: Optional[int]) -> None:
    name = type(module).__name__
    if key == "s_aux":
        heads = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() == 1 else None
        if heads is None or not value.is_floating_point() or (num_heads is not None and heads != num_heads):
            wanted = f"[{num_heads}]" if num_heads is not None else "[query heads]"
            raise ValueError(
                f"{name} passes s_aux={_short(value)} to the attention function: doublesparse serves learned sinks "
                f"as one float logit per query head, shape {wanted}, and cannot tell what this one means"
            )
    elif key == "softcap":
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{name} passes softcap={_short(value)} to the attention function: doublesparse serves logit "
                "softcapping with a positive finite number (tanh(logits / softcap) * softcap)"
            )


def check_head_sizes(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError unless queries and keys share one head size (values may have their own, as in MLA)."""
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"{type(module).__name__} attends with query heads of {query.shape[-1]} channels and key heads of "
            f"{key.shape[-1]}: doublesparse scores keys with the query's channels, so they must be the same size"
        )


def _one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # Identity, not ==: a tensor value must not be compared element-wise.
    for candidate in allowed:
        if value is candidate:
            return True
    return False


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on: its first parameter's (CPU for a module without parameters).

    A module that accelerate dispatches (device_map, CPU or disk offload) computes on its hook's execution
    device, wherever its weights rest between calls (on "meta" when offloaded).
    """
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")

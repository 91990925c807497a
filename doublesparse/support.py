"""Which models Double Sparsity can serve, and where their attention modules are.

The runtime, calibration capture and the evaluation baselines all patch the same modules, found the
same way: the module of each decoder layer that carries a `layer_idx`, a q (or fused qkv) projection
and the model config, which is how transformers' attention classes look.

What the attention function is handed is checked too. `UNDERSTOOD_ATTENTION_KWARGS` lists every
keyword argument transformers passes to an attention function that doublesparse understands, in one
place: anything else (learned sinks `s_aux`, logit `softcap`, packed-sequence lengths, whatever a new
model adds) is refused by name, at `apply` where the model's config or modules already show it, and at
every call as a net. An argument passed as None is a feature the model does not use, and is
accepted. Verified against the calls of Llama, Mistral, Qwen2, Qwen3, Phi3, Mixtral and
Gemma3 (forward, greedy, sampling, beam, static-cache and assisted generation, training) in
transformers 5.17 and 5.23 (tests/test_bad_input.py records them).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .layout import HeadLayout

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

# What refused keyword arguments are, for the error message.
KNOWN_UNSUPPORTED = {
    "s_aux": "learned attention sinks",
    "sinks": "learned attention sinks",
    "softcap": "attention logit softcapping",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
    "max_length_q": "packed (varlen) sequences",
    "max_length_k": "packed (varlen) sequences",
    "seq_idx": "packed sequences",
    "is_causal": "non-causal (bidirectional) attention",
    "output_attentions": "returning attention weights",
}

# Config fields of multi-head latent attention (DeepSeek-V2/V3): keys and values of other head sizes.
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


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
    text = model.config.get_text_config(decoder=True)
    mla = {field: getattr(text, field) for field in MLA_FIELDS if getattr(text, field, None) is not None}
    if mla:
        key_size = (mla.get("qk_nope_head_dim") or 0) + (mla.get("qk_rope_head_dim") or 0)
        sizes = (
            f" (key heads of {key_size} channels, value heads of {mla['v_head_dim']})" if "v_head_dim" in mla else ""
        )
        raise ValueError(
            f"{name} uses multi-head latent attention (MLA: {', '.join(sorted(mla))}){sizes}, which doublesparse does "
            "not serve yet: its labels and sparse attention assume keys and values of one head size"
        )
    for field in ("attn_logit_softcapping",):
        if getattr(text, field, None) is not None:
            raise ValueError(
                f"{name} uses {field} (attention logit softcapping), which doublesparse does not implement"
            )
    if layout.num_heads % layout.num_kv_heads:
        raise ValueError(f"{layout.num_heads} query heads do not split into {layout.num_kv_heads} KV groups")
    modules = attention_modules(model, layout)
    for module in modules:
        _check_attention_module(module)
    return modules


def _check_attention_module(module: torch.nn.Module) -> None:
    name = type(module).__name__
    if isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise ValueError(
            f"{name} has learned attention sinks ({name}.sinks, passed to the attention function as s_aux), which "
            "doublesparse does not implement: its dense and sparse paths would drop them"
        )
    key, value = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
    key_width, value_width = getattr(key, "out_features", None), getattr(value, "out_features", None)
    if key_width is not None and value_width is not None and key_width != value_width:
        raise ValueError(
            f"{name} projects keys to {key_width} and values to {value_width} features: doublesparse serves keys "
            "and values of one head size"
        )


def check_attention_kwargs(module: torch.nn.Module, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError naming any keyword argument of an attention call that doublesparse does not understand."""
    for key, value in kwargs.items():
        if key in UNDERSTOOD_ATTENTION_KWARGS:
            continue
        if value is None:  # the model passes the argument but does not use the feature
            continue
        if _one_of(value, ATTENTION_KWARG_VALUES.get(key, ())):
            continue
        what = KNOWN_UNSUPPORTED.get(key, "an attention feature")
        raise ValueError(
            f"{type(module).__name__} passes {key}={_short(value)} ({what}) to the attention function, which "
            "doublesparse does not understand: its results would be silently wrong, so it refuses this model "
            "(remove the patch with doublesparse.remove(model))"
        )


def check_head_sizes(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError unless queries, keys and values of an attention call share one head size."""
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        raise ValueError(
            f"{type(module).__name__} attends with query, key and value heads of {query.shape[-1]}, {key.shape[-1]} "
            f"and {value.shape[-1]} channels: doublesparse serves one head size (multi-head latent attention is not "
            "served yet)"
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

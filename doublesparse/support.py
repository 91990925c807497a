"""Which models Double Sparsity can serve, and where their attention modules are.

The runtime, calibration capture and the evaluation baselines all patch the same modules, found the
same way: the module of each decoder layer that carries a `layer_idx`, a q (or fused qkv) projection
and the model config, which is how transformers' attention classes look.
"""

from __future__ import annotations

import torch

from .layout import HeadLayout


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


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")

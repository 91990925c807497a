"""`HeadLayout`: the attention shape of a model, read from its config (no weights needed).

Multi-head latent attention (DeepSeek-V2/V3 and the MLA models built like them) attends with keys of
`qk_nope_head_dim + qk_rope_head_dim` channels, one per query head, and values of `v_head_dim`:
`head_dim` is the key size (what channels are ranked over and labels are made of), `value_head_dim`
the value size where it differs.

A model is named by the last part of its config's `_name_or_path` (the hub name, or the folder's
name), and identified across machines by `shape_fingerprint`, a hash of the config sizes that fix its
weights' shapes: neither depends on where the model was loaded from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

# Config fields that fix the shapes of a decoder's weights (those a config lacks count as None).
SHAPE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_local_experts",
    "num_experts",
    "moe_intermediate_size",
)


# Config fields of multi-head latent attention.
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class HeadLayout:
    """Layers, heads and head_dim (the key size) of a decoder, which layers use a sliding window, and the
    value size where it differs from the key size (None: the same)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""
    name: str = ""
    sliding_layers: tuple[int, ...] = ()
    value_head_dim: Optional[int] = None

    @property
    def value_dim(self) -> int:
        """Channels of a value head."""
        return self.head_dim if self.value_head_dim is None else self.value_head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "HeadLayout":
        """Read the layout of a transformers config (the text decoder's, for composite models)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        try:
            num_layers = int(text.num_hidden_layers)
            num_heads = int(text.num_attention_heads)
        except AttributeError as error:
            raise ValueError(
                f"config of type {type(config).__name__} has no num_hidden_layers/num_attention_heads: "
                "doublesparse serves decoder-only attention models"
            ) from error
        num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        value_head_dim = None
        if is_mla(text):
            # The attention expands the latent into one key and one value per query head.
            num_kv_heads = num_heads
            head_dim = int(text.qk_nope_head_dim) + int(text.qk_rope_head_dim)
            if int(text.v_head_dim) != head_dim:
                value_head_dim = int(text.v_head_dim)
        return cls(
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            model_type=str(getattr(text, "model_type", "")),
            name=model_name(config),
            sliding_layers=_sliding_layers(text, num_layers),
            value_head_dim=value_head_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (`value_head_dim` only where it differs from head_dim)."""
        data = asdict(self)
        data["sliding_layers"] = list(self.sliding_layers)
        if self.value_head_dim is None:
            del data["value_head_dim"]
        return data


def is_mla(config: Any) -> bool:
    """Whether a (text) config describes multi-head latent attention: all of MLA's size fields are set."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return all(isinstance(getattr(text, field, None), int) for field in MLA_FIELDS)


def model_name(config: Any) -> str:
    """The model's name: the last part of the config's `_name_or_path` ('' when it has none)."""
    return stable_name(str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""))


def stable_name(name_or_path: str) -> str:
    """The last part of a hub name or a folder path: the same wherever the model was loaded from."""
    return name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def shape_fingerprint(config: Any) -> str:
    """A short hash of the config sizes that fix a model's weights' shapes, and of its head layout."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    values = {name: getattr(text, name, None) for name in SHAPE_FIELDS}
    values["head_dim"] = HeadLayout.from_config(config).head_dim
    encoded = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _sliding_layers(text: Any, num_layers: int) -> tuple[int, ...]:
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return tuple(i for i, kind in enumerate(layer_types) if kind != "full_attention")
    window = getattr(text, "sliding_window", None)
    # Qwen2-style configs carry a window that only applies when use_sliding_window is set.
    if window and getattr(text, "use_sliding_window", True):
        return tuple(range(num_layers))
    return ()

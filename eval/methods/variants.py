"""Method variants: one method run with some SparsityConfig fields of its own, beside others in one grid.

`double_sparsity+num_channels=8+label_bits=4` is Double Sparsity with r = 8 and 4-bit labels whatever the
grid's base config says. Variants of a grid share its dense prefixes, so an ablation of several settings
costs one prefill per prompt, not one per setting. Fields are SparsityConfig's; values are ints, floats,
`true`/`false`, words, or layer lists written `0/1/2`. `token_budget` and `simulate` belong to the grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from doublesparse.config import SparsityConfig

from .base import Method

SEPARATOR = "+"
GRID_FIELDS = ("token_budget", "simulate")  # set by the grid for every method


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """'double_sparsity+num_channels=8' -> ('double_sparsity', {'num_channels': 8}); ValueError for bad fields."""
    base, *items = name.split(SEPARATOR)
    fields = {f.name: f for f in dataclasses.fields(SparsityConfig)}
    overrides: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not text:
            raise ValueError(f"method variant {name!r}: {item!r} is not FIELD=VALUE")
        if key not in fields or key in GRID_FIELDS:
            allowed = sorted(set(fields) - set(GRID_FIELDS))
            raise ValueError(
                f"method variant {name!r}: {key!r} is not a SparsityConfig field a method may set; "
                f"fields: {', '.join(allowed)}"
            )
        overrides[key] = _value(key, text)
    SparsityConfig().replace(**overrides)  # validated now, before any weights load
    return base, overrides


def _value(key: str, text: str) -> Any:
    if key in ("dense_layers", "sync_layers"):
        return tuple(int(part) for part in text.split("/") if part)
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class VariantMethod(Method):
    """A method with SparsityConfig overrides of its own; everything else is the wrapped method's."""

    def __init__(self, name: str, method: Method, overrides: dict[str, Any]) -> None:
        self.name, self.method, self.overrides = name, method, overrides
        self.description = f"{method.description} with {overrides}"
        self.sparse = method.sparse
        self.needs_channels = method.needs_channels
        self.needs_prefix_attention = method.needs_prefix_attention

    def settings(self) -> dict[str, Any]:
        return {**self.method.settings(), "variant_of": self.method.name, "overrides": self.overrides}

    def run_config(self, config: SparsityConfig) -> SparsityConfig:
        return self.method.run_config(config.replace(**self.overrides))

    def patch(self, model, config, channels=None):
        return self.method.patch(model, config, channels)

    def prefix_cache(self, model, prefix):
        return self.method.prefix_cache(model, prefix)

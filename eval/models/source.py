"""Which model an evaluation runs on: resolved and checked before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from doublesparse.layout import HeadLayout

BUNDLED = "bundled"
TINY_RANDOM = "tiny-random"


def bundled_model_present() -> bool:
    """Whether the trained bundled model's weights are installed."""
    from doublesparse.default_model import default_model_path

    return (default_model_path() / "model.safetensors").is_file()


@dataclass
class ModelSource:
    """A model to evaluate: `name` ("bundled", "tiny-random" or a local folder / hub id) and what it is."""

    name: str
    description: str
    trained: bool
    seed: int = 0

    def config(self) -> Any:
        """The model's transformers config (no weights read)."""
        if self.name == TINY_RANDOM:
            from .tiny_random import tiny_config

            return tiny_config()
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path(), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read the config of model {self.name!r}: {error}; "
                f"pass a local model folder, {BUNDLED} or {TINY_RANDOM}"
            ) from error

    def path(self) -> str:
        """Where the model is loaded from."""
        if self.name == BUNDLED:
            from doublesparse.default_model import default_model_path

            return str(default_model_path())
        return self.name

    def layout(self) -> HeadLayout:
        """The head layout, read from the config alone."""
        return HeadLayout.from_config(self.config())

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """(model in eval mode, tokenizer)."""
        if self.name == TINY_RANDOM:
            from .tiny_random import tiny_model_and_tokenizer

            return tiny_model_and_tokenizer(self.seed)
        if self.name == BUNDLED:
            from doublesparse.default_model import load_default_model

            return load_default_model(dtype=dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.name, dtype=dtype, local_files_only=True).eval()
        return model, AutoTokenizer.from_pretrained(self.name, local_files_only=True)

    def info(self) -> dict[str, Any]:
        """JSON description for result files."""
        path = self.path() if self.name != TINY_RANDOM else None
        return {"name": self.name, "path": path, "description": self.description, "trained": self.trained,
                "seed": self.seed, "layout": self.layout().to_dict()}


def resolve_model(name: str, seed: int = 0) -> ModelSource:
    """The ModelSource for `name`; ValueError if it cannot be found (nothing is loaded)."""
    if name == TINY_RANDOM:
        description = "tiny Llama with RANDOM weights (a stand-in: its figures say nothing about sparsity)"
        return ModelSource(TINY_RANDOM, description, False, seed)
    if name == BUNDLED:
        if not bundled_model_present():
            raise ValueError(
                "the bundled model is not installed (no weights in doublesparse/assets/default_model); "
                f"use --model {TINY_RANDOM} or a local model folder"
            )
        description = "bundled small trained Llama-architecture model (doublesparse/assets/default_model)"
        return ModelSource(BUNDLED, description, True, seed)
    source = ModelSource(name, f"model {name}", True, seed)
    source.config()  # raises ValueError if it cannot be read
    return source

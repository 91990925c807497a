"""Which model an evaluation runs on, and its channel mask: resolved and checked before any weights load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from doublesparse.channels import ChannelMask
from doublesparse.layout import HeadLayout

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
TINY_RANDOM = "tiny-random"
# Names a calibrated mask may carry inside the bundled model's folder.
SHIPPED_MASK_NAMES = ("channels.safetensors", "channel_mask.safetensors", "channels_qk.safetensors")


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
            from .fallback_model import tiny_config

            return tiny_config()
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path(), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the config of model {self.name!r}: {error}; pass a local model folder, {BUNDLED} or {TINY_RANDOM}") from error

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
            from .fallback_model import tiny_model_and_tokenizer

            return tiny_model_and_tokenizer(self.seed)
        if self.name == BUNDLED:
            from doublesparse.default_model import load_default_model

            return load_default_model(dtype=dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.name, dtype=dtype, local_files_only=True).eval()
        return model, AutoTokenizer.from_pretrained(self.name, local_files_only=True)

    def info(self) -> dict[str, Any]:
        """JSON description for result files."""
        return {"name": self.name, "path": self.path() if self.name != TINY_RANDOM else None, "description": self.description,
                "trained": self.trained, "seed": self.seed, "layout": self.layout().to_dict()}


def resolve_model(name: str, seed: int = 0) -> ModelSource:
    """The ModelSource for `name`; ValueError if it cannot be found (nothing is loaded)."""
    if name == TINY_RANDOM:
        return ModelSource(TINY_RANDOM, "tiny Llama with RANDOM weights (a stand-in: its figures say nothing about sparsity)", False, seed)
    if name == BUNDLED:
        if not bundled_model_present():
            raise ValueError(f"the bundled model is not installed (no weights in doublesparse/assets/default_model); use --model {TINY_RANDOM} or a local model folder")
        return ModelSource(BUNDLED, "bundled small trained Llama-architecture model (doublesparse/assets/default_model)", True, seed)
    source = ModelSource(name, f"model {name}", True, seed)
    source.config()  # raises ValueError if it cannot be read
    return source


def shipped_mask_path() -> Optional[Path]:
    """A calibrated channel mask shipped beside the bundled model, if any."""
    from doublesparse.default_model import default_model_path

    for name in SHIPPED_MASK_NAMES:
        path = default_model_path() / name
        if path.is_file():
            return path
    return None


def load_channel_mask(path: str, layout: HeadLayout) -> ChannelMask:
    """Load a channel mask file and check it fits `layout`; ValueError saying what to do otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"channel mask {path!r} does not exist; make one with `doublesparse calibrate`")
    mask = ChannelMask.load(path, layout=layout)
    mask.validate(layout)
    return mask


def calibrate_channels(model: torch.nn.Module, tokenizer: Any, num_samples: int = 32, seq_len: int = 512, seed: int = 0, progress: bool = True) -> tuple[ChannelMask, dict[str, Any]]:
    """Calibrate on the bundled calibration text (disjoint from the held-out text): (mask, description)."""
    from doublesparse.calibration import calibrate
    from doublesparse.default_model import default_calibration_text

    text = default_calibration_text()
    mask = calibrate(model, tokenizer, [text], kind="qk", num_samples=num_samples, seq_len=seq_len, seed=seed, progress=progress,
                     source="doublesparse/assets/default_model/calibration.txt")
    return mask, {"source": "calibrated now", "text": "doublesparse/assets/default_model/calibration.txt", "num_samples": num_samples, "seq_len": seq_len, "seed": seed, "kind": "qk"}

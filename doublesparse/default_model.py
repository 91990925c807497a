"""The small trained Llama-architecture model shipped inside the package (see its MODEL_CARD.md).

It is trained by `scripts/train_default_model.py` on the Python standard library and synthetic
retrieval documents, so it has a working retrieval circuit at up to 2K tokens and loads with no
model hub. `AutoModelForCausalLM.from_pretrained(default_model_path())` works as well.
"""

from __future__ import annotations

from pathlib import Path

import torch


def default_model_path() -> Path:
    """Folder of the bundled checkpoint (weights, configs, tokenizer, calibration and held-out texts)."""
    return Path(__file__).resolve().parent / "assets" / "default_model"


def default_calibration_text() -> str:
    """Calibration text of the bundled model: Python stdlib files never used in its training."""
    return (default_model_path() / "calibration.txt").read_text(encoding="utf-8")


def default_heldout_text() -> str:
    """Held-out text of the bundled model (disjoint from training and calibration), for perplexity."""
    return (default_model_path() / "heldout.txt").read_text(encoding="utf-8")


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the bundled model and tokenizer offline: returns (LlamaForCausalLM in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no bundled model at {path}; run scripts/train_default_model.py to create it")
    # local_files_only: a folder on disk needs no hub, and nothing may try the network.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer

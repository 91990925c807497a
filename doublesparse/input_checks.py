"""What a command names as its inputs, checked before any work: the device, and the model folder.

`check_device` asks whether this machine has the device a `--device` option names (`cuda` on a machine
without CUDA, `cuda:3` on a machine with one GPU, `bogus`: each a ValueError saying what to pass), and
`check_model_folder` whether a folder given as `--model` holds a model that transformers can load
(its config, its weights and, where the command needs one, its tokenizer), so that a wrong folder is
named as such instead of failing inside transformers with a message about what it lacked first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# Files that hold a model's weights, as save_pretrained writes them (sharded ones through an index).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# Files a saved tokenizer holds (at least one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_device(device: Optional[str], option: str = "--device", device_map: Optional[str] = None) -> None:
    """ValueError unless `device` (a --device value; None: the command's default) names a device this machine has."""
    import torch

    if device is None:
        return
    if device_map:
        raise ValueError(f"{option} and --device-map both place the model: pass one of them")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    backend: Any = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"{option} {device!r}: this machine has no {parsed.type} device available: use {option} cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{option} {device!r}: this machine has {count} {parsed.type} device(s), numbered from 0")


def check_model_folder(name: Optional[str], option: str = "--model", needs_tokenizer: bool = True) -> None:
    """ValueError for a `--model` that is an existing path but not a model folder transformers can load.

    A name that is no path on this machine (a hub id) is left to the loader. A folder must hold
    config.json and weights (and a tokenizer when `needs_tokenizer`), or a .gguf checkpoint, which its
    loader reads instead.
    """
    if name is None:
        return
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return
        raise ValueError(f"{option} {name!r} is a file: pass the model's folder (what save_pretrained wrote)")
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        if any(path.glob("*.gguf")):
            return
        raise ValueError(
            f"{option} {name!r} is a folder without config.json, not a transformers model folder: pass the folder "
            "that save_pretrained wrote (config.json, weights, tokenizer)"
        )
    missing = []
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if needs_tokenizer and not any((path / file).is_file() for file in TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(
            f"{option} {name!r} holds config.json but no {' and no '.join(missing)}: pass the whole folder that "
            "save_pretrained wrote"
        )

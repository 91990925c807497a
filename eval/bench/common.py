"""What the benchmarks share: option parsing, device and thread setup, cache sizes, report files and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union


def parse_contexts(text: str, option: str = "--contexts") -> list[int]:
    """'4K,32768' -> [4096, 32768] (K = 1024); ValueError naming `option` otherwise."""
    lengths = []
    for item in text.split(","):
        item = item.strip().upper()
        try:
            length = int(item[:-1]) * 1024 if item.endswith("K") else int(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a length like 4096 or 4K") from None
        if length < 1:
            raise ValueError(f"{option}: lengths must be positive, got {item!r}")
        lengths.append(length)
    return lengths


def positive_ints(text: str, option: str) -> list[int]:
    """'1,8' -> [1, 8]; ValueError naming `option` unless every item is an int >= 1."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of ints") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{option}: values must be >= 1, got {text!r}")
    return values


def resolve_device(name: Optional[str]) -> Any:
    """The torch device of a --device option (None: cuda when available, else cpu); ValueError if unusable."""
    import torch

    from doublesparse.input_checks import check_device

    check_device(name)
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    return device


def check_report_outputs(out_dir: Union[str, Path], benchmark: str, plot: bool) -> None:
    """ValueError unless --out-dir can take bench_<benchmark>.json (and .png when `plot`): checked before any work."""
    from doublesparse.output_paths import check_output_folder

    names = [f"bench_{benchmark}.json"] + ([f"bench_{benchmark}.png"] if plot else [])
    check_output_folder(out_dir, "--out-dir", names)


def check_threads(threads: Optional[int]) -> None:
    """ValueError unless a --threads option is None (torch's choice) or positive."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")


def set_threads(threads: Optional[int]) -> None:
    """Use `threads` torch CPU threads (None: leave torch's choice); ValueError unless positive."""
    import torch

    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)


def synchronizer(device: Any) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU), to bracket timings with."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cache_kv_bytes(cache: Any) -> tuple[int, int]:
    """(key bytes, value bytes) a transformers cache holds in its layers' `keys` and `values` tensors."""
    tensors = {"keys": 0, "values": 0}
    for layer in cache.layers:
        for name in tensors:
            tensor = getattr(layer, name, None)
            if tensor is not None:
                tensors[name] += tensor.numel() * tensor.element_size()
    return tensors["keys"], tensors["values"]


def random_channel_mask(layout: Any, seed: int) -> Any:
    """A ChannelMask of random channel rankings for `layout`: speed does not depend on which channels are kept."""
    import torch

    from doublesparse.channels import ChannelMask

    generator = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    ranking = torch.rand(shape, generator=generator).argsort(dim=-1)
    return ChannelMask(ranking, "qk", layout, per_kv_head=True, calibration={"source": "random (speed only)"})


def write_report(report: dict[str, Any], path: Path, sort_keys: bool = False) -> None:
    """Write a benchmark report as indented JSON, atomically (a crash leaves no half-written file)."""
    from doublesparse.output_paths import write_text

    write_text(path, json.dumps(report, indent=2, sort_keys=sort_keys, default=str) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Lay out `figure`, write it to `path` as PNG, atomically, and close it."""
    from doublesparse.output_paths import atomic_write

    figure.tight_layout()
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    finally:
        pyplot().close(figure)

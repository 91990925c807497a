"""Reading a calibrated mask: concentration tables and a heatmap of channel importance.

Concentration at r is the share of a head's statistic mass held by its top r channels: near r/d the
head has no outlier channels and few channels approximate it poorly; near 1 a few channels carry it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from doublesparse.channels import ChannelMask, atomic_write

PathLike = Union[str, os.PathLike]


def radii_for(head_dim: int, wanted: Sequence[int] = (8, 16, 32)) -> list[int]:
    """The channel counts of `wanted` below head_dim (at least one)."""
    radii = [r for r in wanted if r < head_dim]
    return radii or [max(1, head_dim // 2)]


def concentration_summary(mask: ChannelMask, radii: Sequence[int]) -> str:
    """Per layer, the concentration at each r averaged over heads, as an aligned text table."""
    rows = [[f"{layer}"] for layer in range(mask.num_layers)]
    means = ["mean"]
    for r in radii:
        per_layer = mask.concentration(r).mean(dim=-1)
        for layer, value in enumerate(per_layer.tolist()):
            rows[layer].append(f"{value:.3f}")
        means.append(f"{float(per_layer.mean()):.3f}")
    header = ["layer"] + [f"r={r}" for r in radii]
    return _table(header, rows + [means])


def head_table(mask: ChannelMask, r: int) -> str:
    """Concentration at r of every head of every layer (rows layers, columns heads), as text."""
    values = mask.concentration(r)
    header = ["layer"] + [f"h{h}" for h in range(mask.num_heads)] + ["mean"]
    rows = [
        [f"{layer}"] + [f"{v:.2f}" for v in values[layer].tolist()] + [f"{float(values[layer].mean()):.3f}"]
        for layer in range(mask.num_layers)
    ]
    return _table(header, rows)


def top_channels_table(mask: ChannelMask, r: int) -> str:
    """The top r channels of every head (for masks that store no statistics)."""
    top = mask.ranking[..., :r]
    rows = [
        [f"{layer}", f"{head}", " ".join(str(c) for c in top[layer, head].tolist())]
        for layer in range(mask.num_layers)
        for head in range(mask.num_heads)
    ]
    return _table(["layer", "head", f"top {r} channels, best first"], rows)


def importance(mask: ChannelMask) -> torch.Tensor:
    """Channel importance in [0, 1], [layers, heads, head_dim]: statistic over the head's maximum, else from rank."""
    if mask.kind in mask.statistics:
        stat = mask.statistics[mask.kind].float().clamp_min(0)
        return stat / stat.amax(dim=-1, keepdim=True).clamp_min(1e-30)
    position = torch.empty_like(mask.ranking)
    position.scatter_(-1, mask.ranking, torch.arange(mask.head_dim).expand_as(mask.ranking).contiguous())
    return 1.0 - position.float() / max(1, mask.head_dim - 1)


def plot_importance(mask: ChannelMask, path: PathLike, *, layer: Optional[int] = None) -> None:
    """Save a heatmap of channel importance: rows (layer, head) or one layer's heads, columns channels."""
    if layer is not None and not 0 <= layer < mask.num_layers:
        raise ValueError(f"layer must be in [0, {mask.num_layers}), got {layer}")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    values = importance(mask)
    rows_name = "KV head" if mask.per_kv_head else "head"
    if layer is not None:
        image = values[layer]
        ylabel, title = rows_name, f"layer {layer}: {mask.kind} channel importance"
    else:
        image = values.reshape(-1, mask.head_dim)
        ylabel, title = (
            f"layer x {rows_name}",
            f"{mask.kind} channel importance (rows: layers, {mask.num_heads} {rows_name}s each)",
        )
    height = min(12.0, max(3.0, image.shape[0] * 0.08 + 1.5))
    figure, axes = pyplot.subplots(figsize=(max(6.0, mask.head_dim * 0.06 + 2), height))
    shown = axes.imshow(image.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    if layer is None and mask.num_layers > 1:
        for boundary in range(1, mask.num_layers):
            axes.axhline(boundary * mask.num_heads - 0.5, color="white", linewidth=0.4)
        step = max(1, mask.num_layers // 16)
        tick_layers = range(0, mask.num_layers, step)
        axes.set_yticks([layer * mask.num_heads + (mask.num_heads - 1) / 2 for layer in tick_layers])
        axes.set_yticklabels([str(layer) for layer in tick_layers])
        ylabel = "layer"
    axes.set_xlabel("channel")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.colorbar(
        shown, ax=axes, label="importance (head max = 1)" if mask.kind in mask.statistics else "1 - rank / d"
    )
    figure.tight_layout()
    suffix = os.path.splitext(str(path))[1].lstrip(".") or "png"
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format=suffix))
    finally:
        pyplot.close(figure)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)

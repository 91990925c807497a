"""`ChannelMask`: per layer and head, the ranking of the head_dim channels by importance.

Stored as safetensors: the ranking tensor (and, when calibration produced them, the per-channel
statistics of every kind and the low-rank label projections), with JSON metadata (kind, head layout,
model identity, calibration settings). Format version 2 added the optional projections
(`projection.key`, `projection.query`); version 1 files load unchanged. The authors' JSON format (also
read by SGLang) loads too.

Reducing per-query-head rankings to per-KV-head ones (GQA). Where per-channel statistics are stored,
the statistics of the query heads of a group are summed and ranked again. Where only rankings exist
(the authors' files), the rankings are combined by Borda count: each channel scores the sum over the
group's query heads of its position in their rankings, lower is better; ties go to the channel with
the best single position, then to the lower channel index.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layout import HeadLayout

logger = logging.getLogger(__name__)

KINDS = ("q", "k", "qk")
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # 2: optional low-rank label projections
PathLike = Union[str, os.PathLike]


@dataclass
class ChannelMask:
    """Channel rankings [num_layers, num_heads, head_dim] (most important first) and their provenance.

    `per_kv_head` says whether rows are KV heads or query heads. `statistics` optionally holds, per
    kind, the per-channel importance [num_layers, num_heads, head_dim] the ranking came from.
    `projection` optionally holds the calibrated low-rank label projections, per KV head whatever the
    rows: "key" and "query" [num_layers, num_kv_heads, head_dim, rank], columns in decreasing order of
    importance, so their first r columns are the rank-r labels (see kernels/label_projection.py).
    """

    ranking: torch.Tensor
    kind: str
    layout: HeadLayout
    per_kv_head: bool
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    projection: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ChannelMask kind must be one of {KINDS}, got {self.kind!r}")
        self.ranking = torch.as_tensor(self.ranking).to(torch.int64)
        self.check_rankings()
        self.check_projection()

    # ----------------------------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        """Layers covered."""
        return self.ranking.shape[0]

    @property
    def num_heads(self) -> int:
        """Rows per layer (KV heads or query heads, see `per_kv_head`)."""
        return self.ranking.shape[1]

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.ranking.shape[2]

    def check_rankings(self) -> None:
        """Raise ValueError unless every row is a permutation of range(head_dim)."""
        if self.ranking.dim() != 3:
            raise ValueError(
                f"channel ranking must be [layers, heads, head_dim], got shape {tuple(self.ranking.shape)}"
            )
        head_dim = self.ranking.shape[2]
        if self.ranking.numel() and (self.ranking.min() < 0 or self.ranking.max() >= head_dim):
            raise ValueError(
                f"channel indices out of range: they must lie in [0, {head_dim}), found {int(self.ranking.min())}.."
                f"{int(self.ranking.max())}; the file is corrupt or was made for a different head_dim"
            )
        expected = torch.arange(head_dim).expand_as(self.ranking)
        not_perm = (self.ranking.sort(dim=-1).values != expected).any(dim=-1).nonzero()
        if len(not_perm):
            layer, head = (int(x) for x in not_perm[0])
            raise ValueError(
                f"channel ranking of layer {layer}, head {head} is not a permutation of the {head_dim} channels "
                "(duplicated or missing indices): recalibrate or fix the file"
            )

    def check_projection(self) -> None:
        """Raise ValueError unless the projections, if any, are key and query tables of one shape fitting the mask."""
        if not self.projection:
            return
        if set(self.projection) != {"key", "query"}:
            raise ValueError(f"a mask's projection holds 'key' and 'query' tables, got {sorted(self.projection)}")
        key, query = self.projection["key"], self.projection["query"]
        if key.shape != query.shape or key.dim() != 4:
            raise ValueError(
                f"projection tables must be two [layers, kv_heads, head_dim, rank] tensors of one shape, got "
                f"{tuple(key.shape)} and {tuple(query.shape)}: recalibrate"
            )
        if key.shape[0] != self.num_layers or key.shape[2] != self.head_dim:
            raise ValueError(
                f"projection tables {tuple(key.shape)} do not fit a mask of {self.num_layers} layers and head_dim "
                f"{self.head_dim}: recalibrate"
            )

    def projection_tables(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-`rank` label projections (key, query), each [layers, kv_heads, head_dim, rank], fp32."""
        if not self.projection:
            raise ValueError(
                "this channel mask holds no label projections: calibrate it again with this version "
                "(doublesparse calibrate), or use labels='channels'"
            )
        stored = self.projection["key"].shape[3]
        if not 1 <= rank <= stored:
            raise ValueError(f"projection labels of rank {rank}: this mask stores ranks 1..{stored}")
        return (
            self.projection["key"][..., :rank].float().contiguous(),
            self.projection["query"][..., :rank].float().contiguous(),
        )

    def validate(self, layout: HeadLayout) -> None:
        """Raise ValueError, saying what to do, unless this mask fits a model with `layout`."""
        again = "calibrate this model (doublesparse calibrate) or pass the mask made for it"
        if self.num_layers != layout.num_layers:
            raise ValueError(
                f"channel mask has {self.num_layers} layers but the model has {layout.num_layers}: {again}"
            )
        if self.head_dim != layout.head_dim:
            raise ValueError(f"channel mask has head_dim {self.head_dim} but the model has {layout.head_dim}: {again}")
        wanted = layout.num_kv_heads if self.per_kv_head else layout.num_heads
        if self.num_heads != wanted:
            rows = "KV heads" if self.per_kv_head else "query heads"
            raise ValueError(
                f"channel mask has {self.num_heads} rows of {rows} per layer but the model has {wanted} {rows}: {again}"
            )
        if self.projection and self.projection["key"].shape[1] != layout.num_kv_heads:
            raise ValueError(
                f"channel mask projections have {self.projection['key'].shape[1]} KV heads but the model has "
                f"{layout.num_kv_heads}: {again}"
            )
        if self.layout.name and layout.name and self.layout.name != layout.name:
            logger.warning("channel mask was calibrated on %r, applied to %r", self.layout.name, layout.name)

    # ----------------------------------------------------------------------------------- views
    def top(self, num_channels: int) -> torch.Tensor:
        """The `num_channels` best channels of every head, [layers, heads, r], in ascending index order."""
        if not 1 <= num_channels <= self.head_dim:
            raise ValueError(f"num_channels must be in [1, {self.head_dim}], got {num_channels}")
        return self.ranking[..., :num_channels].sort(dim=-1).values

    def per_kv(self) -> "ChannelMask":
        """This mask with one row per KV head (query-head rows reduced as the module docstring says)."""
        if self.per_kv_head:
            return self
        group = self.layout.num_heads // self.layout.num_kv_heads
        if group == 1:
            return replace(self, per_kv_head=True)
        stats = {k: _sum_groups(v, group) for k, v in self.statistics.items()}
        if self.kind in stats:
            ranking = rank_statistic(stats[self.kind], self.calibration.get("rope_pair_dim", 0))
        else:
            ranking = borda_reduce(self.ranking, group)
        return replace(self, ranking=ranking, per_kv_head=True, statistics=stats)

    def with_kind(self, kind: str) -> "ChannelMask":
        """The mask ranked by another stored statistic kind."""
        if kind == self.kind:
            return self
        if kind not in self.statistics:
            raise ValueError(f"this mask stores statistics for {sorted(self.statistics)}, not {kind!r}")
        ranking = rank_statistic(self.statistics[kind], self.calibration.get("rope_pair_dim", 0))
        return replace(self, ranking=ranking, kind=kind)

    def concentration(self, num_channels: int) -> torch.Tensor:
        """Share of the statistic's mass in the top r channels, [layers, heads] (needs statistics)."""
        if self.kind not in self.statistics:
            raise ValueError("concentration needs the calibration statistics, which this mask does not store")
        stat = self.statistics[self.kind].float().clamp_min(0)
        top = stat.gather(-1, self.ranking[..., :num_channels])
        return top.sum(-1) / stat.sum(-1).clamp_min(1e-30)

    # ----------------------------------------------------------------------------------- files
    def save(self, path: PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename)."""
        tensors = {"ranking": self.ranking.to(torch.int32).contiguous()}
        for kind, stat in self.statistics.items():
            tensors[f"statistics.{kind}"] = stat.float().contiguous()
        for side, table in self.projection.items():
            tensors[f"projection.{side}"] = table.float().contiguous()
        metadata = {
            "format": "doublesparse.channel_mask",
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "per_kv_head": json.dumps(self.per_kv_head),
            "layout": json.dumps(self.layout.to_dict(), sort_keys=True),
            "calibration": json.dumps(self.calibration, sort_keys=True),
        }
        atomic_write(path, lambda tmp: _save_canonical(tensors, metadata, tmp))

    @classmethod
    def load(cls, path: PathLike, *, kind: Optional[str] = None, layout: Optional[HeadLayout] = None) -> "ChannelMask":
        """Read a safetensors mask, or the authors' JSON format (`kind` picks its entry, default "qk").

        The authors' files carry no head layout; pass `layout` (HeadLayout.from_config(model.config))
        to know KV heads from query heads, or it is inferred from the rows of the q and k entries.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"channel mask file {str(path)!r} does not exist")
        if path.suffix == ".json":
            return cls._load_authors_json(path, kind or "qk", layout)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "doublesparse.channel_mask":
                raise ValueError(f"{str(path)!r} is not a doublesparse channel mask (no format metadata)")
            version = metadata.get("format_version", "1")
            if version not in READABLE_VERSIONS:
                raise ValueError(
                    f"{str(path)!r} is a channel mask of format version {version}; this doublesparse reads versions "
                    f"{', '.join(READABLE_VERSIONS)}: upgrade doublesparse"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        mask = cls(
            ranking=tensors["ranking"],
            kind=metadata["kind"],
            layout=HeadLayout(**_layout_fields(json.loads(metadata["layout"]))),
            per_kv_head=json.loads(metadata["per_kv_head"]),
            statistics={n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("statistics.")},
            calibration=json.loads(metadata.get("calibration", "{}")),
            projection={n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("projection.")},
        )
        return mask.with_kind(kind) if kind else mask

    @classmethod
    def _load_authors_json(cls, path: Path, kind: str, layout: Optional[HeadLayout]) -> "ChannelMask":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        table = _authors_entries(data, kind, path)
        num_layers = len(table)
        rows = {k: len(v[0]) for k, v in ((k, _authors_entries(data, k, path, missing_ok=True)) for k in KINDS) if v}
        ranking = torch.tensor(table, dtype=torch.int64)
        head_dim = ranking.shape[2]
        if layout is None:
            num_heads = max(rows.get("q", 0), rows.get("qk", 0), ranking.shape[1])
            num_kv = rows.get("k", num_heads)
            layout = HeadLayout(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim)
        per_kv = ranking.shape[1] == layout.num_kv_heads and (kind == "k" or layout.num_kv_heads == layout.num_heads)
        if not per_kv and ranking.shape[1] != layout.num_heads:
            raise ValueError(
                f"{str(path)!r} has {ranking.shape[1]} rows per layer for kind {kind!r}; the model has "
                f"{layout.num_heads} query heads and {layout.num_kv_heads} KV heads"
            )
        note = {"source": "authors-json", "file": path.name}
        if kind in ("q", "k"):
            note["note"] = "the authors rank q and k channels before RoPE"
        return cls(ranking=ranking, kind=kind, layout=layout, per_kv_head=per_kv, calibration=note)

    def to_authors_json(self, path: PathLike) -> None:
        """Write the authors'/SGLang JSON format (per query head rows for q/qk, KV rows for k), atomically."""
        data: dict[str, list] = {}
        group = self.layout.num_heads // self.layout.num_kv_heads
        kinds = sorted(set(self.statistics) | {self.kind})
        for kind in kinds:
            mask = self.with_kind(kind)
            ranking = mask.ranking
            if kind == "k" and not mask.per_kv_head:
                ranking = mask.per_kv().ranking
            elif kind != "k" and mask.per_kv_head:
                ranking = ranking.repeat_interleave(group, dim=1)
            for layer in range(self.num_layers):
                data[f"model.layers.{layer}.self_attn.{kind}_proj"] = ranking[layer].tolist()

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle)

        atomic_write(path, write)


def _layout_fields(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["sliding_layers"] = tuple(data.get("sliding_layers", ()))
    return data


def _authors_entries(data: dict, kind: str, path: Path, missing_ok: bool = False) -> list:
    prefix, suffix = "model.layers.", f".self_attn.{kind}_proj"
    found = {}
    for key, value in data.items():
        if key.startswith(prefix) and key.endswith(suffix):
            found[int(key[len(prefix) : -len(suffix)])] = value
    if not found:
        if missing_ok:
            return []
        raise ValueError(f"{str(path)!r} has no '{kind}_proj' entries; pick another kind with kind=")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{str(path)!r}: layers of kind {kind!r} are not numbered 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def _sum_groups(stat: torch.Tensor, group: int) -> torch.Tensor:
    layers, heads, dim = stat.shape
    return stat.view(layers, heads // group, group, dim).sum(dim=2)


def rank_statistic(statistic: torch.Tensor, rope_pair_dim: int = 0) -> torch.Tensor:
    """Channels of every head [..., d] by decreasing statistic; with `rope_pair_dim`, RoPE pairs stay together.

    RoPE (rotate_half) rotates channel c with c + rope_pair_dim // 2 for c < rope_pair_dim // 2. With
    pairs kept, a pair ranks by the mean of its two statistics, its stronger member first, the other right
    after it; channels beyond rope_pair_dim (partial rotary) rank alone. Ties go to the lower index.
    """
    if not rope_pair_dim:
        return statistic.argsort(dim=-1, descending=True, stable=True)
    dim = statistic.shape[-1]
    half = rope_pair_dim // 2
    if rope_pair_dim % 2 or not 0 < rope_pair_dim <= dim:
        raise ValueError(f"rope_pair_dim must be even and in [2, {dim}], got {rope_pair_dim}")
    low = torch.arange(half)
    unpaired = torch.arange(rope_pair_dim, dim)
    # Units: pairs (c, c + half), then unpaired channels; an unpaired channel's second member is -1.
    first = torch.cat([low, unpaired]).expand(*statistic.shape[:-1], -1).clone()
    second = torch.cat([low + half, torch.full_like(unpaired, -1)]).expand_as(first).clone()
    pair_low, pair_high = statistic[..., :half], statistic[..., half:rope_pair_dim]
    swap = pair_high > pair_low
    first[..., :half] = torch.where(swap, low + half, low)
    second[..., :half] = torch.where(swap, low, low + half)
    unit_score = torch.cat([(pair_low + pair_high) / 2, statistic[..., rope_pair_dim:]], dim=-1)
    order = unit_score.argsort(dim=-1, descending=True, stable=True)
    members = torch.stack([first.gather(-1, order), second.gather(-1, order)], dim=-1).flatten(-2)
    return members[members >= 0].view(statistic.shape).to(torch.int64)


def borda_reduce(ranking: torch.Tensor, group: int) -> torch.Tensor:
    """Combine per-query-head rankings [L, H_q, d] into per-KV-head ones [L, H_q // group, d]."""
    layers, heads, dim = ranking.shape
    position = torch.empty_like(ranking)
    position.scatter_(-1, ranking, torch.arange(dim).expand_as(ranking).contiguous())
    position = position.view(layers, heads // group, group, dim)
    total = position.sum(dim=2)
    best = position.min(dim=2).values
    # One sortable key: total position first, then best single position, then channel index.
    key = (total * (dim + 1) + best) * dim + torch.arange(dim)
    return key.argsort(dim=-1)


def _save_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    # safetensors writes the header map in hash order, so the same mask gave different bytes on each
    # save; rewriting the header with sorted keys makes equal masks give equal files.
    save_file(tensors, path, metadata=metadata)
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(
        json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    header += b" " * (-len(header) % 8)
    Path(path).write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size :])


def atomic_write(path: PathLike, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

"""`ChannelMask`: per layer and head, the ranking of the head_dim channels by importance.

Stored as safetensors: the ranking tensor (and, when calibration produced them, the per-channel
statistics of every kind and the calibrated low-rank label projections), with JSON metadata (kind, head
layout, model identity, calibration settings). Format version 2 added the optional projections
(`projection.key`, `projection.query`); a mask without them is written as version 1, which every
earlier reader reads. The authors' JSON format (also read by SGLang) loads too. Reading either format checks
every field (mask_files.py); a `ChannelMask` checks on construction that its parts agree: every
row a permutation, a layout that fits the ranking's shape, statistics of the ranking's shape that are
finite, non-negative and order the ranking they come with. GQA reductions are in ranking.py.

The authors' files carry no head layout. Loaded without `layout=`, the layout is guessed from the
rows (`layout_inferred`), and `for_model` (which `doublesparse.apply` calls) takes the model's.

Every saved file carries a content hash in its metadata (`content_sha256`, see `content_hash`), checked
when it is loaded, so that a mask served somewhere can be pinned by it; files written before hashes
existed load with their hash computed.

A mask applied to a model other than the one it was calibrated on (by name, the last part of the
config's `_name_or_path`, or by `shape_fingerprint`) is noted in a warning, once per process for
each pair.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .layout import HeadLayout, stable_name
from .mask_files import (
    FORMAT,
    FORMAT_VERSION,
    HASH_KEY,
    KINDS,
    atomic_write,
    check_mask_path,
    content_hash,
    read_authors_json,
    read_mask_file,
    save_canonical,
    write_authors_json,
)
from .ranking import RopePairs, borda_reduce, rank_statistic, sum_groups
from .serving import sglang_classic_problem

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "ChannelMask",
    "RopePairs",
    "atomic_write",
    "borda_reduce",
    "content_hash",
    "rank_statistic",
]

PathLike = Union[str, os.PathLike]
AGAIN = "calibrate this model (doublesparse calibrate) or pass the mask made for it"

# (mask's model, model applied to) pairs already warned about in this process: the note is given once.
_WARNED_PAIRS: set[tuple[str, str, str, str]] = set()


@dataclass
class ChannelMask:
    """Channel rankings [num_layers, num_heads, head_dim] (most important first) and their provenance.

    `per_kv_head` says whether rows are KV heads or query heads. `statistics` optionally holds, per
    kind, the per-channel importance [num_layers, num_heads, head_dim] the ranking came from.
    `layout_inferred` marks a layout guessed from the rows of a file that carried none.
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
    layout_inferred: bool = False
    projection: dict[str, torch.Tensor] = field(default_factory=dict)
    # Set by `load`: the content hash of the file this mask was read from, and how it was obtained.
    source_hash: str = field(default="", init=False, compare=False, repr=False)
    source_hash_note: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ChannelMask kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.layout, HeadLayout):
            raise ValueError(f"ChannelMask layout must be a HeadLayout, got {type(self.layout).__name__}")
        for name in ("per_kv_head", "layout_inferred"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ChannelMask {name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.statistics, dict) or not isinstance(self.calibration, dict):
            raise ValueError("ChannelMask statistics and calibration must be dicts")
        self.ranking = _integer_ranking(self.ranking)
        self.check_rankings()
        self.check_layout()
        self.check_statistics()
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
        if self.ranking.dim() != 3 or 0 in self.ranking.shape:
            raise ValueError(
                f"channel ranking must be a non-empty [layers, heads, head_dim], got shape {tuple(self.ranking.shape)}"
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

    def check_layout(self) -> None:
        """Raise ValueError unless this mask's own layout describes its ranking's shape."""
        layout = self.layout
        sizes = (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise ValueError(f"the mask's head layout holds non-positive or non-int sizes: {layout}")
        if layout.num_heads % layout.num_kv_heads:
            raise ValueError(f"the mask's layout has {layout.num_heads} query heads in {layout.num_kv_heads} KV groups")
        rows = layout.num_kv_heads if self.per_kv_head else layout.num_heads
        expected = (layout.num_layers, rows, layout.head_dim)
        if tuple(self.ranking.shape) != expected:
            what = "KV heads" if self.per_kv_head else "query heads"
            raise ValueError(
                f"the ranking has shape {tuple(self.ranking.shape)} but the mask's layout says {expected} "
                f"(layers, {what}, head_dim): the file is inconsistent"
            )

    def check_statistics(self) -> None:
        """Raise ValueError unless the statistics have the ranking's shape, are finite and >= 0, and order it."""
        pairs = self.rope_pairs
        for kind, stat in self.statistics.items():
            if kind not in KINDS:
                raise ValueError(f"statistics of kind {kind!r}: kinds are {KINDS}")
            if not isinstance(stat, torch.Tensor) or not stat.dtype.is_floating_point:
                raise ValueError(f"statistics.{kind} must be a floating-point tensor, got {_describe(stat)}")
            if tuple(stat.shape) != tuple(self.ranking.shape):
                raise ValueError(
                    f"statistics.{kind} have shape {tuple(stat.shape)}, the ranking {tuple(self.ranking.shape)}: "
                    "the file is inconsistent"
                )
            if not bool(torch.isfinite(stat).all()):
                raise ValueError(f"statistics.{kind} hold NaN or infinite values: the file is corrupt")
            if bool((stat < 0).any()):
                raise ValueError(f"statistics.{kind} hold negative values (they are means of absolute values)")
        if self.kind in self.statistics:
            self._check_ranking_follows(self.statistics[self.kind], pairs)

    @property
    def rope_pairs(self) -> RopePairs:
        """The RoPE pairs the ranking keeps together (recorded by calibration; none by default)."""
        return RopePairs.from_calibration(self.calibration, self.head_dim)

    def _check_ranking_follows(self, statistic: torch.Tensor, pairs: RopePairs) -> None:
        # Each channel scores as it was ranked: alone, or (RoPE pairs kept) by its pair's mean. Along
        # the ranking those scores may not rise, beyond float32 rounding (ties may go either way).
        score = statistic.double()
        if pairs.dim:
            score = (score + score[..., pairs.partners(score.shape[-1])]) / 2
        ordered = score.gather(-1, self.ranking)
        rise = ordered[..., 1:] - ordered[..., :-1]
        disagree = (rise > 1e-5 * ordered[..., :-1].abs().clamp_min(1e-30)).any(dim=-1)
        bad = disagree.nonzero()
        if len(bad):
            layer, head = (int(x) for x in bad[0])
            raise ValueError(
                f"the ranking of layer {layer}, head {head} does not follow its stored {self.kind!r} statistics "
                "(a later channel has a larger statistic): the file is inconsistent; recalibrate or fix it"
            )

    def check_projection(self) -> None:
        """Raise ValueError unless the projections, if any, are key and query tables of one shape fitting the mask."""
        if not isinstance(self.projection, dict):
            raise ValueError(f"ChannelMask projection must be a dict, got {type(self.projection).__name__}")
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
        if key.shape[0] != self.num_layers or key.shape[1] != self.layout.num_kv_heads or key.shape[2] != self.head_dim:
            raise ValueError(
                f"projection tables {tuple(key.shape)} do not fit a mask of {self.num_layers} layers, "
                f"{self.layout.num_kv_heads} KV heads and head_dim {self.head_dim}: recalibrate"
            )
        if not (torch.isfinite(key).all() and torch.isfinite(query).all()):
            raise ValueError("the mask's projection tables hold non-finite values: recalibrate")

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

    def validate(self, layout: HeadLayout, fingerprint: Optional[str] = None) -> None:
        """Raise ValueError, saying what to do, unless this mask fits a model with `layout`.

        A mask calibrated on another model (by name, or by `fingerprint`, layout.py's shape_fingerprint)
        is noted in a warning, once per process for each pair.
        """
        again = AGAIN
        if self.layout_inferred:
            again += (
                "; this mask was read from an authors' JSON file that records no head layout, so its rows were "
                "guessed: load it with ChannelMask.load(path, layout=HeadLayout.from_config(model.config)), or "
                "use mask.for_model(layout) or doublesparse.apply, which take the model's"
            )
        self._check_size(layout, again)
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
        self._note_other_model(layout, fingerprint)

    def for_model(self, layout: HeadLayout, fingerprint: Optional[str] = None) -> "ChannelMask":
        """This mask checked against a model (see `validate`); a mask with an inferred layout takes the model's."""
        mask = self._with_layout(layout) if self.layout_inferred else self
        mask.validate(layout, fingerprint)
        return mask

    def _check_size(self, layout: HeadLayout, again: str) -> None:
        if self.num_layers != layout.num_layers:
            raise ValueError(
                f"channel mask has {self.num_layers} layers but the model has {layout.num_layers}: {again}"
            )
        if self.head_dim != layout.head_dim:
            raise ValueError(f"channel mask has head_dim {self.head_dim} but the model has {layout.head_dim}: {again}")

    def _with_layout(self, layout: HeadLayout) -> "ChannelMask":
        # Rows of a file without layout: one per query head, or one per KV head (the k kind, or MHA).
        self._check_size(layout, AGAIN)
        if self.num_heads not in (layout.num_heads, layout.num_kv_heads):
            raise ValueError(
                f"the mask has {self.num_heads} rows per layer; the model has {layout.num_heads} query heads and "
                f"{layout.num_kv_heads} KV heads: {AGAIN}"
            )
        per_kv = self.num_heads == layout.num_kv_heads
        return replace(self, layout=layout, per_kv_head=per_kv, layout_inferred=False)

    def _note_other_model(self, layout: HeadLayout, fingerprint: Optional[str]) -> None:
        # Older masks recorded the folder's absolute path: compare names by their last part only.
        calibrated_on = stable_name(self.layout.name or str(self.calibration.get("model", "")))
        recorded = self.calibration.get("model_fingerprint")
        recorded = recorded if isinstance(recorded, str) else None
        applied_to = stable_name(layout.name)
        other_name = bool(calibrated_on and applied_to and calibrated_on != applied_to)
        other_shapes = bool(recorded and fingerprint and recorded != fingerprint)
        if not (other_name or other_shapes):
            return
        pair = (calibrated_on, recorded or "", applied_to, fingerprint or "")
        if pair in _WARNED_PAIRS:
            return
        _WARNED_PAIRS.add(pair)
        shapes = " of other weight shapes" if other_shapes else ""
        logger.warning(
            "doublesparse: the channel mask was calibrated on %r, and is applied to %r, a model%s: its channels may "
            "rank poorly for it; calibrate this model (doublesparse calibrate) to be sure (noted once per process)",
            calibrated_on or "an unnamed model",
            applied_to or "an unnamed model",
            shapes or " of another name",
        )

    # ----------------------------------------------------------------------------------- views
    def top(self, num_channels: int) -> torch.Tensor:
        """The `num_channels` best channels of every head, [layers, heads, r], in ascending index order."""
        if not 1 <= num_channels <= self.head_dim:
            raise ValueError(f"num_channels must be in [1, {self.head_dim}], got {num_channels}")
        return self.ranking[..., :num_channels].sort(dim=-1).values

    def per_kv(self) -> "ChannelMask":
        """This mask with one row per KV head (statistics summed over each group, else rankings by Borda count)."""
        if self.per_kv_head:
            return self
        group = self.layout.num_heads // self.layout.num_kv_heads
        if group == 1:
            return replace(self, per_kv_head=True)
        stats = {k: sum_groups(v, group) for k, v in self.statistics.items()}
        if self.kind in stats:
            ranking = rank_statistic(stats[self.kind], self.rope_pairs)
        else:
            ranking = borda_reduce(self.ranking, group)
        return replace(self, ranking=ranking, per_kv_head=True, statistics=stats)

    def with_kind(self, kind: str) -> "ChannelMask":
        """The mask ranked by another stored statistic kind."""
        if kind == self.kind:
            return self
        if kind not in self.statistics:
            raise ValueError(f"this mask stores statistics for {sorted(self.statistics)}, not {kind!r}")
        ranking = rank_statistic(self.statistics[kind], self.rope_pairs)
        return replace(self, ranking=ranking, kind=kind)

    def concentration(self, num_channels: int) -> torch.Tensor:
        """Share of the statistic's mass in the top r channels, [layers, heads] (needs statistics)."""
        if self.kind not in self.statistics:
            raise ValueError("concentration needs the calibration statistics, which this mask does not store")
        stat = self.statistics[self.kind].float().clamp_min(0)
        top = stat.gather(-1, self.ranking[..., :num_channels])
        return top.sum(-1) / stat.sum(-1).clamp_min(1e-30)

    # ----------------------------------------------------------------------------------- files
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a saved file holds: the ranking (int32), each statistic and projection (float32)."""
        tensors = {"ranking": self.ranking.to(torch.int32).contiguous()}
        for kind, stat in self.statistics.items():
            tensors[f"statistics.{kind}"] = stat.float().contiguous()
        for side, table in self.projection.items():
            tensors[f"projection.{side}"] = table.float().contiguous()
        return tensors

    def content_hash(self) -> str:
        """The SHA-256 content hash a saved file of this mask carries (see `content_hash`)."""
        return content_hash(self.file_tensors())

    def save(self, path: PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename), with its content hash."""
        if self.layout_inferred:
            raise ValueError(
                "this mask's head layout was guessed from an authors' JSON file, which records none: load it with "
                "ChannelMask.load(path, layout=HeadLayout.from_config(model.config)) (or mask.for_model(layout)) "
                "before saving it"
            )
        tensors = self.file_tensors()
        metadata = {
            HASH_KEY: content_hash(tensors),
            "format": FORMAT,
            # Version 1 readers read a mask without projections: only a mask with them needs version 2.
            "format_version": FORMAT_VERSION if self.projection else "1",
            "kind": self.kind,
            "per_kv_head": json.dumps(self.per_kv_head),
            "layout": json.dumps(self.layout.to_dict(), sort_keys=True),
            "calibration": json.dumps(self.calibration, sort_keys=True),
        }
        atomic_write(path, lambda tmp: save_canonical(tensors, metadata, tmp))

    @classmethod
    def load(cls, path: PathLike, *, kind: Optional[str] = None, layout: Optional[HeadLayout] = None) -> "ChannelMask":
        """Read a safetensors mask, or the authors' JSON format (`kind` picks its entry, default "qk").

        The authors' files carry no head layout; pass `layout` (HeadLayout.from_config(model.config))
        to know KV heads from query heads, or it is inferred from the rows of the q and k entries (and
        `for_model` resolves it against a model later). Any fault of the file raises ValueError naming it.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"a channel mask path is a str or path, got {type(path).__name__}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if layout is not None and not isinstance(layout, HeadLayout):
            raise ValueError(f"layout must be a HeadLayout, got {type(layout).__name__}")
        path = Path(path)
        check_mask_path(path)
        try:
            if path.suffix == ".json":
                return cls._load_authors_json(path, kind or "qk", layout)
            parts = read_mask_file(path)
            mask = cls(
                ranking=parts.ranking,
                kind=parts.kind,
                layout=HeadLayout(**parts.layout),
                per_kv_head=parts.per_kv_head,
                statistics=parts.statistics,
                calibration=parts.calibration,
                projection=parts.projection,
            )
            mask = mask.with_kind(kind) if kind else mask
        except ValueError as error:
            message = str(error)
            raise ValueError(message if str(path) in message else f"{str(path)!r}: {message}") from None
        mask.source_hash = parts.content_sha256
        if parts.hash_recorded:
            mask.source_hash_note = "verified against the file's metadata"
        else:
            mask.source_hash_note = "computed at load: the file carries no hash (written before hashes were added)"
            logger.info("%s carries no content hash; computed sha256 %s", path, parts.content_sha256)
        return mask

    @classmethod
    def _load_authors_json(cls, path: Path, kind: str, layout: Optional[HeadLayout]) -> "ChannelMask":
        tables = read_authors_json(path)
        if kind not in tables:
            raise ValueError(
                f"{str(path)!r} has no '{kind}_proj' entries (it has {sorted(tables)}): pick one with kind="
            )
        ranking = tables[kind]
        num_layers, rows, head_dim = ranking.shape
        # Guessed from the rows: q/qk entries hold one per query head, k entries one per KV head.
        query_kinds = [tables[k].shape[1] for k in tables if k != "k"]
        num_heads = max(query_kinds) if query_kinds else rows
        num_kv = tables["k"].shape[1] if "k" in tables else num_heads
        if num_heads % num_kv or rows not in (num_heads, num_kv):
            raise ValueError(
                f"{str(path)!r}: its entries hold {sorted({t.shape[1] for t in tables.values()})} rows per layer, "
                "which no head layout explains: pass layout=HeadLayout.from_config(model.config)"
                if layout is None
                else f"{str(path)!r}: its rows per layer do not fit one head layout"
            )
        guessed = HeadLayout(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim)
        note = {"source": "authors-json", "file": path.name}
        if kind in ("q", "k"):
            note["note"] = "the authors rank q and k channels before RoPE"
        mask = cls(ranking, kind, guessed, rows == num_kv, calibration=note, layout_inferred=True)
        mask = mask if layout is None else mask._with_layout(layout)
        mask.source_hash = mask.content_hash()
        mask.source_hash_note = "computed at load: JSON files carry no hash"
        return mask

    def to_authors_json(self, path: PathLike, *, warn: bool = True) -> None:
        """Write the authors'/SGLang JSON format (per query head rows for q/qk, KV rows for k), atomically.

        SGLang's classic backend serves it correctly only for MHA models (serving.py says why); for a GQA
        model a warning is logged unless `warn` is False (a caller that tells the user itself).
        """
        problem = sglang_classic_problem(self.layout)
        if problem is not None and warn:
            logger.warning("doublesparse: %s", problem)
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
        write_authors_json(path, data)


def _integer_ranking(ranking: Any) -> torch.Tensor:
    # A float ranking would be truncated to channel indices: refuse it instead.
    if not isinstance(ranking, torch.Tensor):
        try:
            ranking = torch.as_tensor(ranking)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"channel ranking must be an integer tensor [layers, heads, head_dim]: {error}") from None
    if ranking.dtype.is_floating_point or ranking.dtype.is_complex or ranking.dtype == torch.bool:
        raise ValueError(f"channel ranking must hold integer channel indices, got {ranking.dtype}")
    return ranking.to(torch.int64)


def _describe(value: Any) -> str:
    return f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__

"""Which attention heads this process holds, for models loaded with transformers' tensor parallelism.

Under `from_pretrained(path, tp_plan="auto")` (launched by torchrun) the q/k/v projections of every
attention layer are split over the ranks: each rank's attention function sees only its own query and KV
heads. Which global heads those are is read, per layer, from what the model itself exposes, never assumed:
- the model's resolved `tp_plan` says whether a projection's output stays sharded ("colwise") or is
  gathered back ("colwise_gather_output", "colwise_rep": every rank then sees every head); a style not
  known here is refused by name;
- a sharded projection's weight is a DTensor, and torch's own shard metadata (placements on its device
  mesh) gives the global rows this rank holds, which must be whole heads;
- the query heads a rank holds must be exactly the query heads of its KV heads (the attention pairs
  local query head i with local KV head i // group).
Checked on transformers 5.17 and 5.23, whose colwise style puts `Shard(0)` DTensor weights on a 1-D
tensor-parallel mesh. `gather_head_rows` puts per-head rows computed by every rank back together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .layout import HeadLayout

# Colwise styles whose output stays sharded over the heads, and those whose output every rank gets whole.
SHARDED_STYLES = ("colwise",)
GATHERED_STYLES = ("colwise_gather_output", "colwise_rep")


@dataclass(frozen=True)
class HeadShard:
    """The global query heads [q_start, q_stop) and KV heads [kv_start, kv_stop) one rank holds in one layer."""

    layer_idx: int
    rank: int
    world_size: int
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    group: Any = field(default=None, compare=False, repr=False)  # the process group of the tensor-parallel mesh

    @property
    def num_heads(self) -> int:
        """Query heads this rank holds."""
        return self.q_stop - self.q_start

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds."""
        return self.kv_stop - self.kv_start

    def rows(self, per_kv_head: bool) -> slice:
        """The rows of a per-KV-head (or per-query-head) table that belong to this rank."""
        return slice(self.kv_start, self.kv_stop) if per_kv_head else slice(self.q_start, self.q_stop)

    def describe(self, layout: HeadLayout) -> str:
        """Who this is, for error messages: rank, layer and head counts, local and global."""
        return (
            f"rank {self.rank} of {self.world_size}, layer {self.layer_idx}: this rank holds query heads "
            f"{self.q_start}..{self.q_stop - 1} ({self.num_heads} of {layout.num_heads}) and KV heads "
            f"{self.kv_start}..{self.kv_stop - 1} ({self.num_kv_heads} of {layout.num_kv_heads})"
        )


def head_shards(
    model: torch.nn.Module, modules: list[torch.nn.Module], layout: HeadLayout
) -> Optional[dict[int, HeadShard]]:
    """Per layer, the heads this rank holds; None when every layer holds all heads (no tensor parallelism).

    ValueError, naming the rank and the head counts, where a rank holds part of a head or query heads
    whose KV heads it does not hold.
    """
    plan = getattr(model, "tp_plan", None) or {}
    names = {id(module): name for name, module in model.named_modules()}
    shards: dict[int, HeadShard] = {}
    for module in modules:
        query = _projection_shard(module, "q_proj", names, plan, layout.num_heads, layout)
        key = _projection_shard(module, "k_proj", names, plan, layout.num_kv_heads, layout)
        if query is None and key is None:
            continue
        rank, world, group = (query or key)[2:]
        q_start, q_stop = query[:2] if query else (0, layout.num_heads)
        kv_start, kv_stop = key[:2] if key else (0, layout.num_kv_heads)
        shard = HeadShard(module.layer_idx, rank, world, q_start, q_stop, kv_start, kv_stop, group)
        _check_groups(shard, layout)
        shards[module.layer_idx] = shard
    if shards and len(shards) != len(modules):
        missing = sorted(set(range(layout.num_layers)) - set(shards))
        raise ValueError(f"tensor parallelism splits the heads of some layers but not of layers {missing}")
    return shards or None


def local_layout(layout: HeadLayout, shards: Optional[dict[int, HeadShard]]) -> HeadLayout:
    """The head layout every layer of this rank sees (the model's own without tensor parallelism)."""
    if not shards:
        return layout
    counts = {(shard.num_heads, shard.num_kv_heads) for shard in shards.values()}
    if len(counts) != 1:
        raise ValueError(f"the layers of this rank hold different head counts {sorted(counts)}: not supported")
    (num_heads, num_kv_heads), *_ = counts
    return HeadLayout(
        num_layers=layout.num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=layout.head_dim,
        model_type=layout.model_type,
        name=layout.name,
        sliding_layers=layout.sliding_layers,
        value_head_dim=layout.value_head_dim,
    )


def gather_head_rows(local: torch.Tensor, shards: dict[int, HeadShard], num_heads: int) -> torch.Tensor:
    """Per-query-head rows [layers, local heads, ...] of every rank put together: [layers, num_heads, ...].

    Every rank must call it (it sums over the tensor-parallel group); each contributes its own heads' rows.
    """
    import torch.distributed as dist

    full = torch.zeros((local.shape[0], num_heads, *local.shape[2:]), dtype=torch.float64)
    for layer, shard in shards.items():
        full[layer, shard.q_start : shard.q_stop] = local[layer].double()
    group = next(iter(shards.values())).group
    dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    return full.to(local.dtype)


def _projection_shard(
    module: torch.nn.Module,
    name: str,
    names: dict[int, str],
    plan: dict[str, str],
    num_heads: int,
    layout: HeadLayout,
) -> Optional[tuple[int, int, int, int, Any]]:
    """(first head, stop head, rank, world size, group) of a sharded projection; None where it is whole."""
    projection = getattr(module, name, None)
    fused = getattr(module, "qkv_proj", None)
    weight = getattr(projection if projection is not None else fused, "weight", None)
    if not _is_dtensor(weight):
        # Not distributed: every head is here. (A model split some other way is caught at the first
        # attention call, whose head counts LayerPlan.check_heads compares with the plan's.)
        return None
    style = _plan_style(plan, f"{names.get(id(module), '')}.{name if projection is not None else 'qkv_proj'}")
    if style in GATHERED_STYLES:
        return None
    if style not in SHARDED_STYLES:
        raise ValueError(
            f"layer {module.layer_idx}: {name} is a distributed tensor with tensor-parallel style {style!r}, "
            f"which doublesparse does not know (it serves {SHARDED_STYLES + GATHERED_STYLES}), so it cannot tell "
            "which heads this rank sees"
        )
    if projection is None:
        raise ValueError(
            f"layer {module.layer_idx}: a fused qkv projection sharded colwise packs query, key and value rows "
            "together; doublesparse serves tensor parallelism only with separate q_proj/k_proj"
        )
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"layer {module.layer_idx}: {name} is distributed over a {mesh.ndim}-D device mesh; doublesparse reads "
            "heads from weights on a 1-D tensor-parallel mesh (as transformers 5.17-5.23 place them)"
        )
    start, stop = _global_rows(weight)
    rank, world = int(mesh.get_local_rank()), int(mesh.size())
    where = f"rank {rank} of {world}, layer {module.layer_idx}"
    head_dim = layout.head_dim
    if start % head_dim or stop % head_dim or stop > num_heads * head_dim:
        kind = "query" if name == "q_proj" else "KV"
        raise ValueError(
            f"{where}: {name} holds rows {start}..{stop - 1} of {num_heads * head_dim}, which are not whole "
            f"{kind} heads of {head_dim} channels ({num_heads} {kind} heads over {world} ranks): use a "
            f"tensor-parallel size that divides {layout.num_kv_heads} KV heads and {layout.num_heads} query heads"
        )
    if start == stop:
        raise ValueError(f"{where}: {name} holds no head at all ({num_heads} heads over {world} ranks)")
    group = mesh.get_group()
    return start // head_dim, stop // head_dim, rank, world, group


def _global_rows(weight: Any) -> tuple[int, int]:
    """[start, stop) of the global output rows a DTensor weight holds on this rank, from torch's shard metadata."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in weight.placements:
        if not isinstance(placement, (Shard, Replicate)) or (isinstance(placement, Shard) and placement.dim != 0):
            raise ValueError(
                f"a projection weight is placed {weight.placements}: doublesparse reads heads only from "
                "weights sharded over their output rows (Shard(0))"
            )
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as error:  # pragma: no cover - depends on the torch version
        raise ValueError(
            "this torch version has no torch.distributed.tensor._utils.compute_local_shape_and_global_offset, "
            "which doublesparse reads a rank's heads from"
        ) from error
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    if tuple(local_shape) != tuple(weight.to_local().shape):
        raise ValueError(f"a projection's local shard {tuple(weight.to_local().shape)} disagrees with its metadata")
    return int(offset[0]), int(offset[0]) + int(local_shape[0])


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def _plan_style(plan: dict[str, str], module_name: str) -> Optional[str]:
    # Plan keys use "*" for layer numbers and may name the module or its weight.
    generic = re.sub(r"\.\d+(\.|$)", r".*\1", module_name)
    for key in (generic, f"{generic}.weight"):
        if key in plan:
            return plan[key]
    return None


def _check_groups(shard: HeadShard, layout: HeadLayout) -> None:
    group = layout.group_size
    local_group, remainder = divmod(shard.num_heads, max(shard.num_kv_heads, 1))
    fits = (
        not remainder
        and local_group == group
        and shard.q_start == shard.kv_start * group
        and shard.q_stop == shard.kv_stop * group
    )
    if not fits:
        raise ValueError(
            f"{shard.describe(layout)}; the query heads of a rank must be exactly those of its KV heads "
            f"({group} per KV head), which this sharding breaks: use a tensor-parallel size that divides "
            f"{layout.num_kv_heads} KV heads"
        )

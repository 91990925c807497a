"""`calibrate`: rank the channels of every head of a model from post-RoPE q/k statistics over some text.

One pass over the calibration blocks collects the q, k and qk statistics together (see
`statistics.py`); the mask is ranked by `kind` and stores all three, so `ChannelMask.with_kind` can
switch without calibrating again. The same pass collects the second moments of q and k that the
low-rank label projections are made from (`projection.py`; `projection=False` skips them).
Statistics are stored per query head (k: each query head holds its
KV head's row), so `ChannelMask.per_kv` sums a group.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from typing import Any, Optional, Sequence

import torch

from doublesparse.architectures import partial_rotary_factor, rope_pairs
from doublesparse.channels import KINDS, ChannelMask, RopePairs, rank_statistic
from doublesparse.layout import HeadLayout, shape_fingerprint
from doublesparse.patch import is_patched
from doublesparse.sharding import gather_head_rows, head_shards, local_layout
from doublesparse.support import check_supported, module_device

from .capture import capturing
from .data import calibration_blocks
from .projection import ProjectionStatistics, StatisticsGroup, rope_frequencies
from .statistics import ChannelStatistics

logger = logging.getLogger(__name__)


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    kind: str = "qk",
    num_samples: int = 256,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    keep_rope_pairs: bool = False,
    progress: bool = True,
    source: Optional[str] = None,
    projection: bool = True,
    projection_positions: Optional[int] = None,
) -> ChannelMask:
    """Calibrate `model` on `texts` (packed into `num_samples` blocks of `seq_len` tokens); rank channels by `kind`."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(
            "texts must be a sequence of documents, got a single string: wrap it in a list, or read a file "
            "with doublesparse.calibration.read_documents(path)"
        )
    check_settings(kind=kind, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
    check_model(model)
    texts = list(texts)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("the calibration data is empty: pass at least one non-empty text")
    blocks = calibration_blocks(tokenizer, texts, num_samples=num_samples, seq_len=seq_len, seed=seed)
    settings = {"source": source or f"{len(texts)} texts", "seq_len": seq_len, "seed": seed}
    return calibrate_blocks(
        model,
        blocks,
        kind=kind,
        batch_size=batch_size,
        keep_rope_pairs=keep_rope_pairs,
        progress=progress,
        calibration=settings,
        projection=projection,
        projection_positions=projection_positions,
    )


def calibrate_blocks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    kind: str = "qk",
    batch_size: int = 8,
    keep_rope_pairs: bool = False,
    progress: bool = True,
    calibration: Optional[dict[str, Any]] = None,
    projection: bool = True,
    projection_positions: Optional[int] = None,
) -> ChannelMask:
    """Calibrate `model` on token blocks [N, L] (padding 0 in `attention_mask`); rank its channels by `kind`."""
    check_settings(kind=kind, batch_size=batch_size)
    layout, modules = check_model(model)
    input_ids, attention_mask = _check_blocks(model, input_ids, attention_mask)
    # Where RoPE turns the key channels in pairs (MLA: its last channels; some models: adjacent ones).
    pairs = rope_pairs(model.config, layout) if keep_rope_pairs else RopePairs()
    started = _start_time()

    # Under tensor parallelism each rank sees its own heads; their statistics are put back together.
    shards = head_shards(model, modules, layout)
    if shards and projection:
        # The moments are per KV head of the whole model; a rank sees only its own heads' q and k.
        logger.warning(
            "tensor parallelism: the low-rank label projections are not calibrated (calibrate on one "
            "process for labels='projection'); the channel ranking is"
        )
        projection = False
    statistics = ChannelStatistics(local_layout(layout, shards))
    moments = ProjectionStatistics(layout) if projection else None
    recorder = StatisticsGroup([statistics, moments]) if moments is not None else statistics
    _run_forwards(model, modules, recorder, input_ids, attention_mask, batch_size, progress)
    means = statistics.means()
    if shards:
        means = {kind: gather_head_rows(mean, shards, layout.num_heads) for kind, mean in means.items()}
    projections, rope_settings = {}, {}
    if moments is not None:
        inv_freq, positions = projection_rope(model, projection_positions)
        projections = moments.projections(inv_freq, positions)
        rope_settings = {"projection_rope_positions": positions if inv_freq is not None else None}
    metadata = {
        "source": "token blocks",
        **(calibration or {}),
        "num_samples": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "tokens": statistics.tokens,
        "kind": kind,
        "keep_rope_pairs": bool(keep_rope_pairs),
        **pairs.to_calibration(),
        "projection": moments is not None,
        **rope_settings,
        # Where the model was loaded from is not recorded: its name and a hash of its shapes identify it.
        "model": layout.name,
        "model_fingerprint": shape_fingerprint(model.config),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "versions": _versions(),
        "time": started,
    }
    return ChannelMask(
        ranking=rank_statistic(means[kind], pairs),
        kind=kind,
        layout=layout,
        per_kv_head=False,
        statistics=means,
        calibration=metadata,
        projection=projections,
    )


def check_settings(*, kind: str = "qk", num_samples: int = 1, seq_len: int = 2, batch_size: int = 1) -> None:
    """Raise ValueError, saying what to change, for calibration settings out of range."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value, least in (("num_samples", num_samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int of at least {least}, got {value!r}")


def check_model(model: torch.nn.Module) -> tuple[HeadLayout, list[torch.nn.Module]]:
    """The head layout and attention modules of a model calibration can serve; ValueError otherwise."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, torch.nn.Module):
        raise ValueError(f"calibration needs a transformers model, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("this model is patched by doublesparse: call doublesparse.remove(model) before calibrating")
    layout = HeadLayout.from_config(config)
    return layout, check_supported(model, layout)


def projection_rope(model: torch.nn.Module, positions: Optional[int]) -> tuple[Optional[torch.Tensor], Optional[int]]:
    """(RoPE frequencies, positions) the projection moments are averaged over (projection.py): the model's
    rotary embedding and, unless given, its context length; (None, None) for a model without one RoPE."""
    if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
        raise ValueError(f"projection_positions must be a positive int, got {positions!r}")
    inv_freq = rope_frequencies(model)
    if inv_freq is None:
        logger.warning("no single RoPE frequency table found: projection moments are not averaged over positions")
        return None, None
    if positions is None:
        text = model.config.get_text_config(decoder=True)
        positions = int(getattr(text, "max_position_embeddings", 0) or 0) or None
    return (inv_freq, positions) if positions else (None, None)


def rope_pair_dim(config: Any, head_dim: int) -> int:
    """Channels of a head that RoPE rotates in pairs, counted from channel 0 (head_dim, or less with partial
    rotary). Where they lie and how they pair is `doublesparse.architectures.rope_pairs`."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rotary = int(head_dim * partial_rotary_factor(text))
    return rotary - rotary % 2


def _check_blocks(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(
            f"calibration blocks must be a non-empty [blocks, seq_len] tensor, got shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point:
        raise ValueError("calibration blocks must hold integer token ids")
    vocab = model.get_input_embeddings().num_embeddings
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(
            f"token ids range over {int(input_ids.min())}..{int(input_ids.max())} "
            f"but the model's vocabulary has {vocab}: "
            "use the model's own tokenizer"
        )
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from the blocks' {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().any()):
            raise ValueError("attention_mask marks every token as padding")
    return input_ids.long(), attention_mask


def _run_forwards(
    model: torch.nn.Module,
    modules: list[torch.nn.Module],
    statistics: "ChannelStatistics | StatisticsGroup",
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    batch_size: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    device = module_device(model.get_input_embeddings())  # where accelerate computes it, for a dispatched model
    extra = {"use_cache": False}
    # Logits over the whole vocabulary are not needed: ask for the last position only where supported.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    total = int(attention_mask.bool().sum()) if attention_mask is not None else input_ids.numel()
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            capturing(model, modules, statistics),
            tqdm(total=total, unit="tok", unit_scale=True, desc="calibrating", disable=not progress) as bar,
        ):
            for start in range(0, len(input_ids), batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
                statistics.token_mask = mask.bool() if mask is not None else None
                model(input_ids=ids, attention_mask=mask, **extra)
                bar.update(int(mask.bool().sum()) if mask is not None else ids.numel())
    finally:
        statistics.token_mask = None
        model.train(was_training)


def _start_time() -> str:
    # SOURCE_DATE_EPOCH (the reproducible-builds convention) pins the recorded time, for byte-identical files.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(datetime.timezone.utc)
    )
    return moment.replace(microsecond=0).isoformat()


def _versions() -> dict[str, str]:
    import transformers

    import doublesparse

    return {
        "doublesparse": doublesparse.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }

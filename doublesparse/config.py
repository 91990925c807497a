"""`SparsityConfig`: the one validated object that carries every Double Sparsity knob."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .kernels.backends import BACKENDS

LABEL_BITS = (16, 8, 4)
SELECTIONS = ("group", "head")
LABEL_KINDS = ("channels", "projection")

TokenBudget = Union[int, float]


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SparsityConfig.{name}={value!r} is invalid: {allowed}")


def _whole(value: Any) -> Any:
    """`value` as a plain int where it is an integer (numpy ints too); anything else unchanged.

    bool is an int in Python, and 4.0 == 4: neither is taken for an int, so `label_bits=4.0` or
    `sink_tokens=True` are refused by the checks below instead of passing them.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _not_an_int(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return f"{value!r} is a float: pass the int {int(value)}"
    if isinstance(value, bool):
        return f"{value!r} is a bool: pass an int"
    return f"{type(value).__name__} is not an int"


# Fields holding one int, and the layer-index sequences; normalised (numpy ints -> int) before validation.
_INT_FIELDS = (
    "num_channels",
    "label_bits",
    "sink_tokens",
    "recent_tokens",
    "min_seq_len",
    "prefetch_warmup_steps",
    "host_memory_limit",
)
_LAYER_FIELDS = ("dense_layers", "sync_layers")


@dataclass(frozen=True)
class SparsityConfig:
    """Every knob of Double Sparsity decoding, validated when constructed.

    num_channels:  r, the label channels per head used to score tokens (1..head_dim).
    token_budget:  tokens attended per step: an int count, or a float in (0, 1] read as a
                   fraction of the current (unpadded) length, rounded up.
    label_bits:    16 (keys' 16-bit dtype, fp16 for fp32 models), 8 or 4 (asymmetric integer
                   quantization per token and head, int4 packed two per byte).
    labels:        "channels" = a label is the key's r calibrated channels (the paper's labels);
                   "projection" = a label is a calibrated rank-r linear map of the key (and the query
                   label its partner map of the query), stored in the channel mask by calibration;
                   per KV head, so it needs selection="group".
    sink_tokens:   first tokens always kept, counted inside the budget.
    recent_tokens: newest tokens always kept (the current token is always kept, whatever this is),
                   counted inside the budget.
    dense_layers:  layer indices that always attend densely.
    min_seq_len:   rows shorter than this attend densely.
    selection:     "group" = one selection per KV head, shared by its query heads;
                   "head" = one selection per query head, as in the paper.
    backend:       "auto" (Triton on CUDA tensors, the native CPU kernels on CPU tensors where a C
                   compiler is found, torch elsewhere), "torch", "triton" or "cpu".
    simulate:      teacher-forced evaluation: every query row of a prefill selects its own top-k
                   among its past, equal row by row to decoding token by token.

    Offloading (Double Sparsity-Offload, see doublesparse/offload.py):
    offload:       full K/V of the sparse layers in host memory; labels and a window of the recent and
                   current tokens on the device; only selected rows are copied in.
    prefetch:      (needs offload) layer i predicts layer i+1's query and copies its rows ahead.
    sync_layers:   layers that select with their own query and copy synchronously; None = layer 0
                   plus the layers whose recall falls below `prefetch_min_recall` in the warm-up.
    prefetch_min_recall:   recall threshold of the automatic choice of sync layers, in [0, 1].
    prefetch_warmup_steps: decode steps of every cache that measure the recall of every layer
                   (they select synchronously) before the sync layers are chosen.
    host_memory_limit:     bytes of host memory the offloaded K/V may take; None = the RAM free now.
    """

    # Defaults from the SmolLM2-135M study (docs/results.md): r = 16 (r = 8 loses retrieval), 4-bit labels
    # (as accurate as 16-bit there, a quarter of the label bytes), 4 sink and 16 recent tokens (continuation
    # perplexity at 1/16 from +12% to +5% over dense, retrieval unchanged).
    num_channels: int = 16
    token_budget: TokenBudget = 1 / 16
    label_bits: int = 4
    labels: str = "channels"
    sink_tokens: int = 4
    recent_tokens: int = 16
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    min_seq_len: int = 0
    selection: str = "group"
    backend: str = "auto"
    simulate: bool = False
    offload: bool = False
    prefetch: bool = False
    sync_layers: Optional[tuple[int, ...]] = None
    prefetch_min_recall: float = 0.5
    prefetch_warmup_steps: int = 4
    host_memory_limit: Optional[int] = None

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _whole(getattr(self, name)))
        if not isinstance(self.token_budget, float):
            object.__setattr__(self, "token_budget", _whole(self.token_budget))
        for name in _LAYER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
                # Checked before sorting: sorting a mix of types would raise TypeError.
                items = tuple(_whole(i) for i in value)
                if all(_is_int(i) and i >= 0 for i in items):
                    items = tuple(sorted(items))
                object.__setattr__(self, name, items)
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.num_channels):
            _fail(
                "num_channels",
                self.num_channels,
                f"a positive int (channels per head): {_not_an_int(self.num_channels)}",
            )
        if self.num_channels < 1:
            _fail("num_channels", self.num_channels, "a positive int (channels per head, at most head_dim)")
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            _fail("token_budget", budget, "an int token count >= 1 or a float fraction in (0, 1]")
        if isinstance(budget, int) and budget < 1:
            _fail("token_budget", budget, "an int token count must be >= 1")
        if isinstance(budget, float) and not (0.0 < budget <= 1.0 and math.isfinite(budget)):
            count = " (for a token count pass an int)" if math.isfinite(budget) and budget > 1 else ""
            _fail("token_budget", budget, f"a float budget is a fraction of the length in (0, 1]{count}")
        if not _is_int(self.label_bits):
            _fail(
                "label_bits",
                self.label_bits,
                f"allowed values are the ints {LABEL_BITS}: {_not_an_int(self.label_bits)}",
            )
        if self.label_bits not in LABEL_BITS:
            _fail("label_bits", self.label_bits, f"allowed values are {LABEL_BITS}")
        if self.label_bits == 4 and self.num_channels % 2:
            _fail("num_channels", self.num_channels, "4-bit labels pack two channels per byte: use an even r")
        for name in ("sink_tokens", "recent_tokens", "min_seq_len"):
            value = getattr(self, name)
            if not _is_int(value):
                _fail(name, value, f"a non-negative int: {_not_an_int(value)}")
            if value < 0:
                _fail(name, value, "a non-negative int")
        if isinstance(budget, int) and self.sink_tokens + max(self.recent_tokens, 1) > budget:
            _fail(
                "token_budget",
                budget,
                f"sink_tokens + recent_tokens (+1 for the current token when recent_tokens=0) = "
                f"{self.sink_tokens + max(self.recent_tokens, 1)} must fit inside the budget",
            )
        if not isinstance(self.dense_layers, tuple) or any(not _is_int(i) or i < 0 for i in self.dense_layers):
            _fail("dense_layers", self.dense_layers, "a sequence of non-negative int layer indices")
        if self.selection not in SELECTIONS:
            _fail("selection", self.selection, f"allowed values are {SELECTIONS}")
        if self.labels not in LABEL_KINDS:
            _fail("labels", self.labels, f"allowed values are {LABEL_KINDS}")
        if self.labels == "projection" and self.selection != "group":
            _fail("labels", self.labels, "projection labels are calibrated per KV head: use selection='group'")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"allowed values are {BACKENDS}")
        if not isinstance(self.simulate, bool):
            _fail("simulate", self.simulate, "True or False")
        self._validate_offload()

    def _validate_offload(self) -> None:
        for name in ("offload", "prefetch"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.prefetch and not self.offload:
            _fail("prefetch", self.prefetch, "prefetching copies offloaded K/V: set offload=True too")
        if self.offload and self.simulate:
            _fail(
                "offload",
                self.offload,
                "simulate evaluates prefills teacher-forced on the device: use one or the other",
            )
        if self.sync_layers is not None and (
            not isinstance(self.sync_layers, tuple) or any(not _is_int(i) or i < 0 for i in self.sync_layers)
        ):
            _fail(
                "sync_layers", self.sync_layers, "None (chosen from measured recall) or a sequence of int layer indices"
            )
        recall = self.prefetch_min_recall
        if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 <= recall <= 1.0:
            _fail("prefetch_min_recall", recall, "a recall threshold in [0, 1]")
        steps = self.prefetch_warmup_steps
        if not _is_int(steps) or steps < 0:
            _fail(
                "prefetch_warmup_steps",
                steps,
                "a non-negative int" + ("" if _is_int(steps) else f": {_not_an_int(steps)}"),
            )
        limit = self.host_memory_limit
        if limit is not None and (not _is_int(limit) or limit < 1):
            detail = "" if _is_int(limit) else f": {_not_an_int(limit)}"
            _fail("host_memory_limit", limit, f"None (the free RAM) or a positive int byte count{detail}")

    def check_model(self, num_layers: int, head_dim: int) -> None:
        """Raise ValueError where a knob does not fit a model of this shape."""
        if self.num_channels > head_dim:
            _fail("num_channels", self.num_channels, f"r must be <= head_dim ({head_dim}) of this model")
        bad = [i for i in self.dense_layers if i >= num_layers]
        if bad:
            _fail("dense_layers", self.dense_layers, f"indices {bad} are out of range for {num_layers} layers")
        bad = [i for i in self.sync_layers or () if i >= num_layers]
        if bad:
            _fail("sync_layers", self.sync_layers, f"indices {bad} are out of range for {num_layers} layers")

    def budget_for(self, length: int) -> int:
        """Tokens attended by one query row whose past (itself included) holds `length` tokens."""
        if length <= 0:
            return 0
        if length < self.min_seq_len:
            return length
        if isinstance(self.token_budget, float):
            wanted = math.ceil(self.token_budget * length - 1e-9)
        else:
            wanted = self.token_budget
        return max(1, min(length, wanted))

    def replace(self, **changes: Any) -> "SparsityConfig":
        """A copy with some fields changed, validated again; unknown fields raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields {unknown}; known fields are {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (for result files and metadata)."""
        data = dataclasses.asdict(self)
        data["dense_layers"] = list(self.dense_layers)
        if self.sync_layers is not None:
            data["sync_layers"] = list(self.sync_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a SparsityConfig dict is a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(repr, set(data) - known))
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields [{', '.join(unknown)}]; known fields are {sorted(known)}")
        # Lists (as JSON gives them) become tuples in __post_init__.
        return cls(**data)

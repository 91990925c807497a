"""Token-selection methods compared by the evaluation harness: one small class per method, one registry.

Every method shares the token-budget semantics of Double Sparsity: the budget is a count or a
fraction of each row's valid length (`SparsityConfig.token_budget`, `row_budgets`), sink and recent
tokens are forced in (`forced_tokens`), and the rest of the budget goes to the highest scores
(`select_tokens_reference`). What differs is only the score of each cached token:

- `dense`: no selection (the reference);
- `double_sparsity` / `random_channels`: `doublesparse.apply` itself, with calibrated or random channels;
- `oracle_topk`: exact q.k over all channels (the upper bound of token selection);
- `streaming_llm`: attention sinks plus the most recent tokens;
- `h2o`: accumulated attention ("heavy hitters") plus a recent window, with eviction while decoding;
- `quest`: per-page min/max key bounds, whole pages selected by their upper bound of q.k;
- `sparq`: q.k over the top-r channels of |q| of the current query (no calibration).

The baselines plug a score function into one shared attention function, registered with
transformers' attention interface under `EVAL_ATTENTION_NAME`; models are never forked. A prefill
(no past) attends densely unless `simulate` is set, as in `doublesparse/attention.py`; in simulate
mode every query row selects its own tokens among its past, as if decoded one by one.

Contract of a method (tested over the whole registry): with a budget covering the whole past it
computes dense attention; it never selects padding or future tokens; it attends exactly its budget.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

import doublesparse
from doublesparse.policy import row_budgets, valid_keys
from doublesparse.step import dense_attention
from doublesparse.channels import ChannelMask
from doublesparse.config import SparsityConfig
from doublesparse.kernels.selection import select_tokens_reference
from doublesparse.kernels.sparse_attention import selection_mask
from doublesparse.layout import HeadLayout
from doublesparse.support import attention_modules, check_supported

EVAL_ATTENTION_NAME = "doublesparse_eval"
EVAL_PLAN_ATTRIBUTE = "_doublesparse_eval_plan"
# Evicted tokens rank below every live token but above padding and future keys (-inf), so a growing
# budget can take them back without ever reaching a key the row may not attend.
EVICTED_SCORE = -1e30
# Marks tokens a method wants before all others (H2O's recent window, Quest's current page).
PREFERRED_SCORE = 1e30


# --------------------------------------------------------------------------------------------- plans
@dataclass
class EvalLayerPlan:
    """What one attention layer does under a baseline: its method, config and per-sequence state."""

    layer_idx: int
    method: "SelectiveMethod"
    config: SparsityConfig
    num_select_heads: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    recorder: Optional[list] = None

    def reset(self) -> None:
        """Forget the per-sequence state (a new prompt starts)."""
        self.state.clear()


@dataclass
class AttentionCall:
    """The tensors one score function sees for one layer call."""

    query: torch.Tensor  # [B, H_q, L, d]
    key: torch.Tensor  # [B, H_kv, T, d]
    valid: torch.Tensor  # [B, L, T] bool: causal and not padding
    budgets: torch.Tensor  # [B, L] tokens attended per row
    scaling: float
    num_select_heads: int
    prefill_rows: bool  # rows of one teacher-forced pass (simulate), not single decode steps


def reduce_to_select_heads(per_query_head: torch.Tensor, num_select_heads: int, how: str = "max") -> torch.Tensor:
    """[B, H_q, L, T] -> [B, H_select, L, T]: consecutive query heads max- (or sum-) reduced, like label scores."""
    batch, num_q_heads = per_query_head.shape[:2]
    grouped = per_query_head.reshape(batch, num_select_heads, num_q_heads // num_select_heads, *per_query_head.shape[2:])
    return grouped.amax(dim=2) if how == "max" else grouped.sum(dim=2)


def expand_kv(key: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """KV heads repeated for their query heads: [B, H_kv, T, d] -> [B, H_q, T, d]."""
    return key.repeat_interleave(num_q_heads // key.shape[1], dim=1)


def exact_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 q.k * scaling per query head: [B, H_q, L, T]."""
    return torch.matmul(query.float(), expand_kv(key, query.shape[1]).float().transpose(-1, -2)) * scaling


def attention_weights(logits: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Softmax of `logits` [B, H_q, L, T] over the attended keys (broadcastable bool); rows with none are 0."""
    return torch.softmax(logits.masked_fill(~attended, float("-inf")), dim=-1).nan_to_num(0.0)


def recent_window(valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [B, L, T]: each row's `counts` [B, L] newest valid keys."""
    rank_from_start = valid.long().cumsum(dim=-1)
    rank_from_end = rank_from_start[..., -1:] - rank_from_start + 1
    return valid & (rank_from_end <= counts[..., None])


# --------------------------------------------------------------------------------------------- methods
class Method:
    """One evaluated method: `patch(model, config, channels)` makes the model attend as the method does."""

    name: str = ""
    description: str = ""
    sparse: bool = True  # False only for the dense reference
    needs_channels: bool = False  # uses a calibrated ChannelMask

    def settings(self) -> dict[str, Any]:
        """The method's own options, for result files."""
        return {}

    def patch(self, model: torch.nn.Module, config: SparsityConfig, channels: Optional[ChannelMask] = None) -> contextlib.AbstractContextManager:
        """Context manager: inside it `model` attends as this method does; restored on exit."""
        raise NotImplementedError


class DenseMethod(Method):
    """Exact attention over every token: the reference every method is compared with."""

    name = "dense"
    description = "exact attention over every token"
    sparse = False

    def patch(self, model, config, channels=None):
        return contextlib.nullcontext(model)


class DoubleSparsityMethod(Method):
    """Double Sparsity itself: `doublesparse.apply` with the calibrated channel mask."""

    name = "double_sparsity"
    description = "top-k tokens by q.k over r calibrated channels (label cache)"
    needs_channels = True

    def __init__(self, kind: Optional[str] = None) -> None:
        self.kind = kind  # q, k or qk; None keeps the mask's own kind

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def channel_mask(self, model: torch.nn.Module, channels: Optional[ChannelMask], seed: int = 0) -> ChannelMask:
        """The mask this method scores with."""
        if channels is None:
            raise ValueError(f"method {self.name!r} needs a calibrated channel mask: pass --channels or calibrate first")
        return channels.with_kind(self.kind) if self.kind else channels

    def patch(self, model, config, channels=None):
        return doublesparse.patched(model, self.channel_mask(model, channels), config)


class RandomChannelsMethod(DoubleSparsityMethod):
    """Ablation: Double Sparsity with the same r but random channels instead of calibrated ones."""

    name = "random_channels"
    description = "Double Sparsity with r random channels (ablation of calibration)"
    needs_channels = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(None)
        self.seed = seed

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def channel_mask(self, model, channels=None, seed: int = 0) -> ChannelMask:
        layout = HeadLayout.from_config(model.config)
        generator = torch.Generator().manual_seed(self.seed)
        ranking = torch.rand(layout.num_layers, layout.num_kv_heads, layout.head_dim, generator=generator).argsort(dim=-1)
        return ChannelMask(ranking, "qk", layout, per_kv_head=True, calibration={"source": f"random, seed {self.seed}"})


class SelectiveMethod(Method):
    """A baseline defined by a score per cached token, run through the shared selective attention."""

    def effective_config(self, config: SparsityConfig) -> SparsityConfig:
        """The config the method runs with (a method may force sink tokens, say)."""
        return config

    def scores(self, plan: EvalLayerPlan, call: AttentionCall) -> torch.Tensor:
        """fp32 scores [B, H_select, L, T]; finite on valid keys; higher is kept first."""
        raise NotImplementedError

    def observe(self, plan: EvalLayerPlan, call: AttentionCall, weights: Optional[torch.Tensor], selected: Optional[torch.Tensor]) -> None:
        """Update per-sequence state after a call: `weights` [B, H_q, L, T] as attended, `selected` [B, H_s, L, T] or None."""

    @property
    def needs_weights(self) -> bool:
        """Whether `observe` needs the attention weights (computed only then)."""
        return False

    def patch(self, model, config, channels=None):
        return selective_patch(model, self, self.effective_config(config))


class OracleTopKMethod(SelectiveMethod):
    """Upper bound of token selection: top-k by exact q.k over every channel."""

    name = "oracle_topk"
    description = "top-k tokens by exact q.k (upper bound of token selection)"

    def scores(self, plan, call):
        return reduce_to_select_heads(exact_logits(call.query, call.key, call.scaling), call.num_select_heads)


class SparQMethod(SelectiveMethod):
    """SparQ attention: q.k over the r channels of largest |q| of the current query, no calibration."""

    name = "sparq"
    description = "top-k tokens by q.k over the top-r channels of |q| at each step"

    def scores(self, plan, call):
        query = call.query.float()
        top = query.abs().topk(plan.config.num_channels, dim=-1).indices  # [B, H_q, L, r]
        sparse_query = torch.zeros_like(query).scatter_(-1, top, query.gather(-1, top))
        return reduce_to_select_heads(exact_logits(sparse_query, call.key, call.scaling), call.num_select_heads)


class StreamingLLMMethod(SelectiveMethod):
    """StreamingLLM: a few attention-sink tokens plus the most recent tokens, whatever their scores."""

    name = "streaming_llm"
    description = "attention sinks plus a recent window"

    def __init__(self, sink_tokens: int = 4) -> None:
        self.sink_tokens = sink_tokens

    def settings(self) -> dict[str, Any]:
        return {"sink_tokens": self.sink_tokens}

    def effective_config(self, config):
        if config.sink_tokens >= self.sink_tokens:
            return config
        if isinstance(config.token_budget, int):
            room = config.token_budget - max(config.recent_tokens, 1)
            return config.replace(sink_tokens=max(config.sink_tokens, min(self.sink_tokens, room)))
        return config.replace(sink_tokens=self.sink_tokens)

    def scores(self, plan, call):
        # Newer keys score higher, so the budget left after the sinks is the recent window.
        batch, rows, length = call.valid.shape
        positions = torch.arange(length, device=call.query.device, dtype=torch.float32)
        return positions.expand(batch, call.num_select_heads, rows, length).clone()


class H2OMethod(SelectiveMethod):
    """H2O: heavy hitters by accumulated attention, plus a recent window; evicted tokens stay out.

    Decoding: the dense prefill seeds each key's accumulated attention; every step keeps the recent
    window and the heaviest live keys, evicts the rest, and adds the step's attention weights.
    Teacher-forced rows (simulate): row i ranks keys by the attention they received from rows
    before i (causal accumulation over the pass, dense weights), with no eviction.
    """

    name = "h2o"
    description = "heavy hitters by accumulated attention plus a recent window"

    def __init__(self, recent_share: float = 0.5) -> None:
        if not 0.0 <= recent_share <= 1.0:
            raise ValueError(f"h2o recent_share must lie in [0, 1], got {recent_share}")
        self.recent_share = recent_share

    def settings(self) -> dict[str, Any]:
        return {"recent_share": self.recent_share}

    @property
    def needs_weights(self) -> bool:
        return True

    def _recent_bonus(self, call: AttentionCall) -> torch.Tensor:
        counts = torch.ceil(call.budgets.double() * self.recent_share - 1e-9).long()
        return recent_window(call.valid, counts)[:, None]

    def scores(self, plan, call):
        batch, rows, length = call.valid.shape
        past = _state_to_length(plan.state.get("accumulated"), batch, call.num_select_heads, length, call.query.device)
        if call.prefill_rows:
            weights = attention_weights(exact_logits(call.query, call.key, call.scaling), call.valid[:, None])
            received = reduce_to_select_heads(weights, call.num_select_heads, "sum")
            scores = past[:, :, None, :] + received.cumsum(dim=2) - received  # rows strictly before each row
        else:
            scores = past[:, :, None, :].expand(batch, call.num_select_heads, rows, length).clone()
            evicted = _state_to_length(plan.state.get("evicted"), batch, call.num_select_heads, length, call.query.device)
            scores = scores.masked_fill(evicted[:, :, None, :].bool(), EVICTED_SCORE)
        return scores.masked_fill(self._recent_bonus(call), PREFERRED_SCORE)

    def observe(self, plan, call, weights, selected):
        batch, rows, length = call.valid.shape
        past = _state_to_length(plan.state.get("accumulated"), batch, call.num_select_heads, length, call.query.device)
        received = reduce_to_select_heads(weights.float(), call.num_select_heads, "sum").sum(dim=2)
        plan.state["accumulated"] = past + received
        if selected is not None and not call.prefill_rows:
            evicted = _state_to_length(plan.state.get("evicted"), batch, call.num_select_heads, length, call.query.device)
            newest = call.valid[:, -1][:, None]  # keys the last row could attend
            plan.state["evicted"] = (evicted.bool() | (newest & ~selected[:, :, -1])).float()


class QuestMethod(SelectiveMethod):
    """Quest: keys in pages of `page_size`; a page's score is an upper bound of q.k from its per-channel
    min and max keys; whole pages are taken in order of that bound until the budget is spent.

    The page holding the query's own position is always preferred (its bounds would otherwise be
    built from keys the row has not seen yet in teacher-forced rows).
    """

    name = "quest"
    description = "whole pages by an upper bound of q.k from per-page min/max keys"

    def __init__(self, page_size: int = 16) -> None:
        if page_size < 1:
            raise ValueError(f"quest page_size must be >= 1, got {page_size}")
        self.page_size = page_size

    def settings(self) -> dict[str, Any]:
        return {"page_size": self.page_size}

    def scores(self, plan, call):
        query, key = call.query.float(), call.key.float()
        batch, num_kv_heads, length, head_dim = key.shape
        num_pages = math.ceil(length / self.page_size)
        padded = num_pages * self.page_size
        real = call.valid[:, -1]  # [B, T]: keys that are not padding (the last row sees all the past)
        real_keys = real[:, None, :, None]
        high = key.masked_fill(~real_keys, float("-inf"))
        low = key.masked_fill(~real_keys, float("inf"))
        high = torch.nn.functional.pad(high, (0, 0, 0, padded - length), value=float("-inf"))
        low = torch.nn.functional.pad(low, (0, 0, 0, padded - length), value=float("inf"))
        page_max = high.view(batch, num_kv_heads, num_pages, self.page_size, head_dim).amax(dim=3)
        page_min = low.view(batch, num_kv_heads, num_pages, self.page_size, head_dim).amin(dim=3)
        empty = torch.isinf(page_max).all(dim=-1, keepdim=True)  # pages of padding only
        page_max = page_max.masked_fill(empty, 0.0)
        page_min = page_min.masked_fill(empty, 0.0)
        num_q_heads = query.shape[1]
        page_max, page_min = expand_kv(page_max, num_q_heads), expand_kv(page_min, num_q_heads)
        # Upper bound of q.k over a page: per channel, q times whichever extreme gives the larger product.
        bound = torch.maximum(query[..., None, :] * page_max[:, :, None], query[..., None, :] * page_min[:, :, None]).sum(-1)
        bound = reduce_to_select_heads(bound * call.scaling, call.num_select_heads)  # [B, H_s, L, P]
        token_page = torch.arange(length, device=key.device) // self.page_size
        scores = bound[..., token_page]
        rows = call.valid.shape[1]
        own_position = length - rows + torch.arange(rows, device=key.device)
        own_page = token_page[None, :] == (own_position // self.page_size)[:, None]  # [L, T]
        # Within a page, older tokens first, so a partly used page is cut at its newest tokens.
        tie_break = -torch.arange(length, device=key.device, dtype=torch.float32) / max(length, 1) * 1e-3
        scores = scores + tie_break
        return scores.masked_fill(own_page[None, None], PREFERRED_SCORE)


def _state_to_length(state: Optional[torch.Tensor], batch: int, heads: int, length: int, device: torch.device) -> torch.Tensor:
    """Per-key state [B, H_s, T]: zeros for keys appended since it was written."""
    if state is None:
        return torch.zeros(batch, heads, length, device=device)
    if state.shape[-1] > length:  # the cache was cropped
        return state[..., :length]
    return torch.nn.functional.pad(state, (0, length - state.shape[-1]))


# --------------------------------------------------------------------------------------------- registry
def method_registry() -> dict[str, Callable[[], Method]]:
    """Method name -> factory of a method with default options."""
    return {
        "dense": DenseMethod,
        "double_sparsity": DoubleSparsityMethod,
        "oracle_topk": OracleTopKMethod,
        "random_channels": RandomChannelsMethod,
        "streaming_llm": StreamingLLMMethod,
        "h2o": H2OMethod,
        "quest": QuestMethod,
        "sparq": SparQMethod,
    }


METHOD_NAMES = tuple(method_registry())


def make_method(name: str, **options: Any) -> Method:
    """A method by registry name; ValueError naming the known ones otherwise."""
    registry = method_registry()
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; known methods are {', '.join(registry)}")
    try:
        return registry[name](**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for method {name!r}: {error}") from error


# --------------------------------------------------------------------------------------------- attention
def selective_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function of the baselines: q [B, H_q, L, d], k/v [B, H_kv, T, d] -> ([B, L, H_q, d], None)."""
    plan: Optional[EvalLayerPlan] = getattr(module, EVAL_PLAN_ATTRIBUTE, None)
    dense_call = lambda: dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if plan is None or module.training or kwargs.get("sliding_window"):
        return dense_call()
    batch, _, rows, head_dim = query.shape
    length = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    config, method = plan.config, plan.method
    if rows == length:  # a new sequence starts: forget the previous one's state
        plan.reset()
    valid = valid_keys(attention_mask, batch, rows, length, query.device)
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    simulate_rows = rows > 1 and config.simulate
    call = AttentionCall(query, key, valid, budgets, scaling, plan.num_select_heads, prefill_rows=rows > 1)
    # A prefill (no past) is dense unless simulating; so is any call whose budgets cover every row.
    if not (simulate_rows or rows < length) or bool((budgets >= lengths).all()):
        out, _ = dense_call()
        if method.needs_weights:
            method.observe(plan, call, attention_weights(exact_logits(query, key, scaling), valid[:, None]), None)
        return out, None

    scores = method.scores(plan, call)
    indices, slot_valid = select_tokens_reference(
        scores, valid, budgets, config.sink_tokens, config.recent_tokens, int(budgets.max())
    )
    selected = selection_mask(indices, slot_valid, length)
    _record(plan, valid, budgets, selected)
    num_q_heads = query.shape[1]
    attended = selected.repeat_interleave(num_q_heads // selected.shape[1], dim=1)
    weights = attention_weights(exact_logits(query, key, scaling), attended)
    out = torch.matmul(weights, expand_kv(value, num_q_heads).float()).to(query.dtype)
    if method.needs_weights:
        method.observe(plan, call, weights, selected)
    return out.transpose(1, 2).contiguous(), None


def _record(plan: EvalLayerPlan, valid: torch.Tensor, budgets: torch.Tensor, selected: torch.Tensor) -> None:
    # Tests read what was selected to check the contract; nothing is kept unless they ask.
    if plan.recorder is not None:
        plan.recorder.append({"layer": plan.layer_idx, "valid": valid, "budgets": budgets, "selected": selected})


def register_selective_attention() -> None:
    """Register the shared baseline attention function and its mask with transformers (idempotent)."""
    AttentionInterface.register(EVAL_ATTENTION_NAME, selective_attention)
    AttentionMaskInterface.register(EVAL_ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def selective_patch(
    model: torch.nn.Module, method: SelectiveMethod, config: SparsityConfig, recorder: Optional[list] = None
) -> Iterator[torch.nn.Module]:
    """Inside: `model` attends with `method` through the shared selective attention; restored on exit."""
    layout = HeadLayout.from_config(model.config)
    check_supported(model, layout)
    config.check_model(layout.num_layers, layout.head_dim)
    modules = attention_modules(model, layout)
    num_select_heads = layout.num_kv_heads if config.selection == "group" else layout.num_heads
    register_selective_attention()
    previous = model.config._attn_implementation
    try:
        for module in modules:
            dense = module.layer_idx in config.dense_layers or module.layer_idx in layout.sliding_layers
            if not dense:
                setattr(module, EVAL_PLAN_ATTRIBUTE, EvalLayerPlan(module.layer_idx, method, config, num_select_heads, recorder=recorder))
        model.set_attn_implementation(EVAL_ATTENTION_NAME)
        yield model
    finally:
        for module in modules:
            if hasattr(module, EVAL_PLAN_ATTRIBUTE):
                delattr(module, EVAL_PLAN_ATTRIBUTE)
        model.set_attn_implementation(previous or "sdpa")

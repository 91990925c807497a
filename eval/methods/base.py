"""The method contract and the selective attention function the baselines share.

A `Method` makes a model attend as the method does, inside `patch(model, config, channels)`. Every
method shares the token-budget semantics of Double Sparsity: the budget is a count or a fraction of
each row's valid length (`SparsityConfig.token_budget`, `row_budgets`), sink and recent tokens are
forced in (`forced_tokens`), and the rest of the budget goes to the highest scores
(`select_tokens_reference`). A `SelectiveMethod` only defines the score of each cached token; it runs
through one shared attention function, registered with transformers' attention interface under
`EVAL_ATTENTION_NAME`, so models are never forked. A prefill (no past) attends densely unless
`simulate` is set, as in `doublesparse/attention.py`; in simulate mode every query row selects its own
tokens among its past, as if decoded one by one. The call's keyword arguments are checked as the runtime
checks them; learned sinks (`s_aux`) and logit softcapping (`softcap`) enter the exact attention over
the selection as they do in the model's own eager attention.

Contract of a method (tested over the whole registry): with a budget covering the whole past it
computes dense attention; it never selects padding or future tokens; it attends exactly its budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache

from doublesparse.attention_patch import attention_patched
from doublesparse.channels import ChannelMask
from doublesparse.config import SparsityConfig
from doublesparse.kernels.attention_math import cap_logits, softmax_with_sinks
from doublesparse.kernels.selection import select_tokens_reference
from doublesparse.kernels.sparse_attention import selection_mask
from doublesparse.layout import HeadLayout
from doublesparse.policy import row_budgets, valid_keys
from doublesparse.step import dense_attention
from doublesparse.support import attention_modules, check_attention_kwargs, check_head_sizes, check_supported

from .prefix import Prefix

EVAL_ATTENTION_NAME = "doublesparse_eval"
EVAL_PLAN_ATTRIBUTE = "_doublesparse_eval_plan"


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
    group = num_q_heads // num_select_heads
    grouped = per_query_head.reshape(batch, num_select_heads, group, *per_query_head.shape[2:])
    return grouped.amax(dim=2) if how == "max" else grouped.sum(dim=2)


def expand_kv(key: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """KV heads repeated for their query heads: [B, H_kv, T, d] -> [B, H_q, T, d]."""
    return key.repeat_interleave(num_q_heads // key.shape[1], dim=1)


def exact_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 q.k * scaling per query head: [B, H_q, L, T]."""
    return torch.matmul(query.float(), expand_kv(key, query.shape[1]).float().transpose(-1, -2)) * scaling


def attention_weights(
    logits: torch.Tensor, attended: torch.Tensor, sinks: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Softmax of `logits` [B, H_q, L, T] over the attended keys (broadcastable bool); rows with none are 0.

    `sinks` [H_q] (gpt-oss's learned sinks) join each row's denominator.
    """
    sink_logits = None if sinks is None else sinks.float().reshape(1, -1, 1, 1)
    return softmax_with_sinks(logits.masked_fill(~attended, float("-inf")), sink_logits)


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
    needs_prefix_attention: bool = False  # its state is seeded from the attention the prefill's keys received

    def settings(self) -> dict[str, Any]:
        """The method's own options, for result files."""
        return {}

    def prefix_cache(self, model: torch.nn.Module, prefix: Prefix) -> Cache:
        """Inside `patch`: a cache holding the dense `prefix`, from which this method's rows continue."""
        return prefix.fill(DynamicCache(config=model.config))

    def run_config(self, config: SparsityConfig) -> SparsityConfig:
        """The config this method runs a grid's setting with (a variant overrides some fields)."""
        return config

    def patch(
        self, model: torch.nn.Module, config: SparsityConfig, channels: Optional[ChannelMask] = None
    ) -> contextlib.AbstractContextManager:
        """Context manager: inside it `model` attends as this method does; restored on exit."""
        raise NotImplementedError


class SelectiveMethod(Method):
    """A baseline defined by a score per cached token, run through the shared selective attention."""

    def effective_config(self, config: SparsityConfig) -> SparsityConfig:
        """The config the method runs with (a method may force sink tokens, say)."""
        return config

    def scores(self, plan: EvalLayerPlan, call: AttentionCall) -> torch.Tensor:
        """fp32 scores [B, H_select, L, T]; finite on valid keys; higher is kept first."""
        raise NotImplementedError

    def observe(
        self,
        plan: EvalLayerPlan,
        call: AttentionCall,
        weights: Optional[torch.Tensor],
        selected: Optional[torch.Tensor],
    ) -> None:
        """Update per-sequence state after a call: `weights` [B, H_q, L, T] as attended, `selected` [B, H_s, L, T].

        `selected` is None after a dense call.
        """

    @property
    def needs_weights(self) -> bool:
        """Whether `observe` needs the attention weights (computed only then)."""
        return False

    @property
    def decodes_row_by_row(self) -> bool:
        """Whether rows after a past must run one at a time (state that each step changes), as decoding does."""
        return False

    def seed_state(self, plan: EvalLayerPlan, prefix: Prefix) -> None:
        """Set the per-sequence state a dense prefill of `prefix` would have left (none by default)."""

    def prefix_cache(self, model, prefix):
        cache = super().prefix_cache(model, prefix)
        for module in model.modules():
            plan = getattr(module, EVAL_PLAN_ATTRIBUTE, None)
            if isinstance(plan, EvalLayerPlan):
                plan.reset()
                self.seed_state(plan, prefix)
        return cache

    def patch(self, model, config, channels=None):
        return selective_patch(model, self, self.effective_config(config))


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
    """The baselines' attention-interface function: q [B, H_q, L, d], k/v [B, H_kv, T, d] -> ([B, L, H_q, d], None)."""
    plan: Optional[EvalLayerPlan] = getattr(module, EVAL_PLAN_ATTRIBUTE, None)
    check_attention_kwargs(module, kwargs, query.shape[1])
    check_head_sizes(module, query, key, value)
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")

    def dense_call() -> tuple[torch.Tensor, Any]:
        return dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    if plan is None or module.training or kwargs.get("sliding_window"):
        return dense_call()
    batch, _, rows, head_dim = query.shape
    length = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    config, method = plan.config, plan.method
    if rows == length:  # a new sequence starts: forget the previous one's state
        plan.reset()
    if method.decodes_row_by_row and 1 < rows < length and not config.simulate:
        # Rows after a past, one at a time: exactly the steps of decoding them token by token.
        past = length - rows
        outputs = []
        for row in range(rows):
            end = past + row + 1
            mask = None if attention_mask is None else attention_mask[:, :, row : row + 1, :end]
            out, _ = selective_attention(
                module,
                query[:, :, row : row + 1],
                key[:, :, :end],
                value[:, :, :end],
                mask,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
            outputs.append(out)
        return torch.cat(outputs, dim=1), None
    valid = valid_keys(attention_mask, batch, rows, length, query.device)
    lengths = valid.sum(dim=-1)
    budgets = row_budgets(config, lengths)
    simulate_rows = rows > 1 and config.simulate
    call = AttentionCall(query, key, valid, budgets, scaling, plan.num_select_heads, prefill_rows=rows > 1)
    # A prefill (no past) is dense unless simulating; so is any call whose budgets cover every row.
    if not (simulate_rows or rows < length) or bool((budgets >= lengths).all()):
        out, _ = dense_call()
        if method.needs_weights:
            logits = cap_logits(exact_logits(query, key, scaling), softcap)
            method.observe(plan, call, attention_weights(logits, valid[:, None], sinks), None)
        return out, None

    scores = method.scores(plan, call)
    indices, slot_valid = select_tokens_reference(
        scores, valid, budgets, config.sink_tokens, config.recent_tokens, int(budgets.max())
    )
    selected = selection_mask(indices, slot_valid, length)
    _record(plan, valid, budgets, selected)
    num_q_heads = query.shape[1]
    attended = selected.repeat_interleave(num_q_heads // selected.shape[1], dim=1)
    weights = attention_weights(cap_logits(exact_logits(query, key, scaling), softcap), attended, sinks)
    out = torch.matmul(weights, expand_kv(value, num_q_heads).float()).to(query.dtype)
    if method.needs_weights:
        method.observe(plan, call, weights, selected)
    return out.transpose(1, 2).contiguous(), None


def _record(plan: EvalLayerPlan, valid: torch.Tensor, budgets: torch.Tensor, selected: torch.Tensor) -> None:
    # Tests read what was selected to check the contract; nothing is kept unless they ask.
    if plan.recorder is not None:
        plan.recorder.append({"layer": plan.layer_idx, "valid": valid, "budgets": budgets, "selected": selected})


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
    plans = {
        module: EvalLayerPlan(module.layer_idx, method, config, num_select_heads, recorder=recorder)
        for module in modules
        if module.layer_idx not in config.dense_layers and module.layer_idx not in layout.sliding_layers
    }
    with attention_patched(model, EVAL_ATTENTION_NAME, selective_attention, EVAL_PLAN_ATTRIBUTE, plans):
        yield model

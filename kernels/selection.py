"""Selection: the top-k tokens of each query row, with sink and recent tokens forced in.

Semantics (shared by every implementation and by the evaluation baselines):
- a row may attend its valid keys only (causal and not padding);
- the row's budget k counts everything it attends;
- the newest valid key (the query's own token) is always kept, with the `recent_tokens` newest
  ones; then the `sink_tokens` oldest valid ones; both are cut to fit inside k, recent first;
- the rest of the budget goes to the highest scores; equal scores go to the more recent token,
  so a selection does not depend on how long the cache buffer is (exact ties are real: a token
  whose embedding is zero, such as a padding id, scores 0 against every key).
Outputs have fixed shapes: `max_budget` slots per row; slots at or past the row's own budget are
marked invalid, and their indices are unspecified (in range, possibly repeating a valid slot's), so
consumers read indices through `slot_valid`. The order of the valid slots is unspecified too. No
host synchronisation is needed once `max_budget` is known.
"""

from __future__ import annotations

from typing import Optional

import torch

from .scratch import Scratch, scratch_or_new


def forced_tokens(valid: torch.Tensor, budgets: torch.Tensor, sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Bool [B, L, T]: the keys a row keeps whatever their score (current, recent, sinks)."""
    rank_from_start = valid.long().cumsum(dim=-1)
    num_valid = rank_from_start[..., -1:]
    rank_from_end = num_valid - rank_from_start + 1
    budgets = budgets[..., None]
    recent_kept = torch.clamp(budgets, max=max(recent_tokens, 1))
    sink_kept = torch.clamp(budgets - recent_kept, min=0, max=sink_tokens)
    return valid & ((rank_from_end <= recent_kept) | (rank_from_start <= sink_kept))


def ranking_keys(scores: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """int64 keys that order fp32 scores exactly, ties broken towards the higher position."""
    bits = scores.float().contiguous().view(torch.int32)
    keys = scratch_or_new(scratch, "rank_keys", bits.shape, torch.int64, bits.device).copy_(bits)
    # Flipping the magnitude bits of negative floats makes their int order match the float order
    # (the sign-extended upper half is left as it is, so the flip can happen after widening).
    flips = scratch_or_new(scratch, "rank_flips", bits.shape, torch.int64, bits.device)
    keys.bitwise_xor_(torch.bitwise_right_shift(keys, 63, out=flips).bitwise_and_(0x7FFFFFFF))
    positions = scratch_or_new(scratch, "rank_positions", (bits.shape[-1],), torch.int64, bits.device)
    return keys.bitwise_left_shift_(32).bitwise_or_(torch.arange(bits.shape[-1], out=positions))


@torch.no_grad()  # a discrete choice: nothing to differentiate, and out= fails where autograd records
def select_tokens_reference(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scratch: Optional[Scratch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (indices [B, H, L, K] int64, slot_valid [B, 1, L, K] bool), K = max_budget.

    scores: [B, H, L, T] approximate scores; valid: [B, L, T] bool; budgets: [B, L] int64 tokens
    per row (at most the row's valid count). With `scratch`, the temporaries and the indices live in
    its buffers (see scratch.py).
    """
    forced = forced_tokens(valid, budgets, sink_tokens, recent_tokens)[:, None]
    # Masking the int64 keys, not the scores, saves a pass: forced tokens share the top key (their
    # order among themselves is free, they all fit in the budget), invalid ones the bottom one.
    keys = ranking_keys(scores, scratch)
    keys.masked_fill_(~valid[:, None], torch.iinfo(torch.int64).min).masked_fill_(forced, torch.iinfo(torch.int64).max)
    shape = (*scores.shape[:-1], max_budget)
    top = scratch_or_new(scratch, "select_top_keys", shape, torch.int64, scores.device)
    indices = scratch_or_new(scratch, "select_indices", shape, torch.int64, scores.device)
    torch.topk(keys, max_budget, dim=-1, sorted=True, out=(top, indices))
    slots = torch.arange(max_budget, device=scores.device)
    slot_valid = (slots < budgets[..., None])[:, None]
    return indices, slot_valid


def select_tokens_cpu(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scratch: Optional[Scratch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native CPU selection (cpu_decode.c): the reference's token sets, one pass per row (radix select, no full topk).

    Slots [0, budget) of a row hold the same tokens as the reference's, forced tokens first and the
    rest in no particular order; the invalid slots repeat slot 0.
    """
    from . import native, native_ops  # native_ops registers the ops; the library is built at first use

    native.require_native()
    batch, heads, rows, num_tokens = scores.shape
    if scores.device.type != "cpu":
        raise ValueError(f"native selection takes CPU tensors, got {scores.device}")
    max_tokens = native.native_limits().max_select_tokens
    if num_tokens > max_tokens:
        raise ValueError(f"native selection indexes at most {max_tokens} tokens, got {num_tokens}; use backend='torch'")
    if valid.shape != (batch, rows, num_tokens) or budgets.shape != (batch, rows):
        raise ValueError(
            f"valid must be [B, L, T] = {(batch, rows, num_tokens)} and budgets [B, L], "
            f"got {tuple(valid.shape)} and {tuple(budgets.shape)}"
        )
    if torch.compiler.is_compiling():  # one graph node; eager skips the dispatcher (see native_ops.py)
        indices = torch.ops.doublesparse.select_tokens(scores, valid, budgets, sink_tokens, recent_tokens, max_budget)
    else:
        shape = (batch, heads, rows, max_budget)
        indices = scratch_or_new(scratch, "select_indices", shape, torch.int64, scores.device)
        shape = (native_ops.selection_threads(scores), 2, num_tokens)
        workspace = scratch_or_new(scratch, "select_workspace", shape, torch.int32, scores.device)
        native_ops.select_tokens_into(scores, valid, budgets, sink_tokens, recent_tokens, indices, workspace)
    slots = torch.arange(max_budget, device=scores.device)
    slot_valid = (slots < budgets[..., None])[:, None]
    return indices, slot_valid

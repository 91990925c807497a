"""A prompt prefilled densely once and shared by every method and budget: `Prefix` and `dense_prefix`.

Every method prefills densely (Double Sparsity and each baseline alike), so the prefill of a prompt
is the same whatever runs after it. The harness runs it once, on the unpatched model, and each method
starts its rows from a copy (`Method.prefix_cache`): Double Sparsity builds its label cache from the
prefix's keys (labels are per token, so they equal the ones a patched prefill appends), and a baseline
whose state comes from the prefill (H2O's accumulated attention) is seeded from what the prefill
measured. Nothing a method does changes the prefill.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache

from doublesparse.attention_patch import attention_patched
from doublesparse.layout import HeadLayout
from doublesparse.step import dense_attention
from doublesparse.support import attention_modules

RECEIVED_NAME = "doublesparse_eval_prefix"
RECEIVED_ATTRIBUTE = "_doublesparse_eval_prefix_received"
# Query rows whose attention weights are formed at once when measuring attention received (bounds memory).
RECEIVED_ROW_CHUNK = 256


@dataclass
class Prefix:
    """A dense prefill: per layer keys and values [B, H_kv, P, d]; optionally, per layer, the attention each
    key received from the prefill's rows, per query head [B, H_q, P] (fp32)."""

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    received: Optional[list[torch.Tensor]] = None

    @property
    def length(self) -> int:
        """Tokens in the prefix."""
        return int(self.input_ids.shape[1])

    def fill(self, cache: Cache) -> Cache:
        """Append the prefix's keys and values to the empty `cache`, layer by layer (a label cache makes labels)."""
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.update(keys, values, layer)
        return cache


def exact_weights(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int) -> torch.Tensor:
    """Causal softmax weights in fp32 [B, H_q, rows, T] of query rows starting at position `first_row`."""
    num_q_heads = query.shape[1]
    keys = key.repeat_interleave(num_q_heads // key.shape[1], dim=1).float()
    logits = torch.matmul(query.float(), keys.transpose(-1, -2)) * scaling
    rows, length = query.shape[2], key.shape[2]
    positions = first_row + torch.arange(rows, device=query.device)
    causal = torch.arange(length, device=query.device)[None, :] <= positions[:, None]
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def _recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    received: Optional[dict] = getattr(module, RECEIVED_ATTRIBUTE, None)
    if received is not None:  # one prompt, no padding: the weights are causal
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        past = key.shape[2] - query.shape[2]
        total = torch.zeros(query.shape[0], query.shape[1], key.shape[2], device=query.device)
        for start in range(0, query.shape[2], RECEIVED_ROW_CHUNK):
            rows = query[:, :, start : start + RECEIVED_ROW_CHUNK]
            total += exact_weights(rows, key, scale, past + start).sum(dim=2)
        received[module.layer_idx] = total
    return dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def _measuring_received(model: torch.nn.Module, received: dict) -> Iterator[None]:
    modules = attention_modules(model, HeadLayout.from_config(model.config))
    with attention_patched(
        model, RECEIVED_NAME, _recording_attention, RECEIVED_ATTRIBUTE, dict.fromkeys(modules, received)
    ):
        yield


@torch.no_grad()
def dense_prefix(model: torch.nn.Module, input_ids: torch.Tensor, attention_received: bool = False) -> Prefix:
    """Prefill `input_ids` [1, P] densely on the unpatched `model`; with `attention_received`, also measure what
    each key received (H2O's seed). The model's outputs are those of its own dense attention either way."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"a prefix is one prompt [1, P >= 1], got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = DynamicCache(config=model.config)
    received: dict[int, torch.Tensor] = {}
    scope = _measuring_received(model, received) if attention_received else contextlib.nullcontext()
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with scope:
        model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    ordered = [received[i] for i in range(len(keys))] if attention_received else None
    return Prefix(input_ids, keys, values, ordered)


def continue_from(model: torch.nn.Module, cache: Cache, rows: torch.Tensor) -> Any:
    """Logits [1, L, V] (fp32) of `rows` [1, L] attended after what `cache` holds."""
    device = next(model.parameters()).device
    output = model(input_ids=rows.to(device), past_key_values=cache, use_cache=True)
    return output.logits.float()

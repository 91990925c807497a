"""`StaticDecoder`: greedy decoding with a preallocated cache and fixed shapes.

Every decode step sees tensors of the same shapes at the same addresses (the cache buffers, a
[B, max_cache_len] attention mask updated in place), allocates no cache memory and reads nothing
back to the host, so the step can run under `torch.compile` and, on CUDA, be captured in a CUDA
graph (`compile_mode="reduce-overhead"`). The same loop serves a patched model (Double Sparsity,
`StaticDoubleSparseCache`) and an unpatched one (dense SDPA, transformers' `StaticCache`), so the two
are compared on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers.cache_utils import StaticCache

from .patch import is_patched, make_cache


@dataclass
class DecodeResult:
    """Tokens generated after the prompt [B, N] and the logits that chose them [B, N, V] (if kept)."""

    tokens: torch.Tensor
    logits: Optional[torch.Tensor]


class StaticDecoder:
    """Greedy decoder over a preallocated cache of `max_cache_len` tokens (prompt + new tokens)."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_cache_len: int,
        *,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        compile_backend: str = "inductor",
        fullgraph: bool = False,
    ):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
        self.model = model
        self.max_cache_len = max_cache_len
        self._step: Callable = self._decode_step
        self._cache_position: Optional[torch.Tensor] = None
        if compile:
            # compile_backend="aot_eager" traces the step as inductor would see it without generating code
            # (seconds instead of a minute on a CPU); fullgraph=True makes any graph break an error.
            self._step = torch.compile(
                self._decode_step, mode=compile_mode, dynamic=False, backend=compile_backend, fullgraph=fullgraph
            )

    def new_cache(self):
        """A fresh preallocated cache: with labels for a patched model, transformers' own otherwise."""
        if is_patched(self.model):
            return make_cache(self.model, self.max_cache_len)
        return StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)

    def _decode_step(self, token, attention_mask, cache_position, position_ids, cache) -> torch.Tensor:
        out = self.model(
            input_ids=token,
            attention_mask=attention_mask,
            cache_position=cache_position,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt; return its last logits [B, V] and the full-width mask buffer [B, max_cache_len]."""
        batch, prompt_len = input_ids.shape
        if prompt_len >= self.max_cache_len:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) must be shorter than max_cache_len ({self.max_cache_len})"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.zeros(batch, self.max_cache_len, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :prompt_len] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1], mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 16,
        keep_logits: bool = False,
    ) -> DecodeResult:
        """Greedy-decode `max_new_tokens` tokens after a (left-padded) prompt."""
        prompt_len = input_ids.shape[1]
        if prompt_len + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) "
                f"exceeds max_cache_len ({self.max_cache_len}): "
                "build the decoder with a larger max_cache_len"
            )
        cache = self.new_cache()
        logits, mask = self.prefill(input_ids, attention_mask, cache)
        return self.decode(cache, mask, logits, prompt_len, max_new_tokens, keep_logits)

    @torch.no_grad()
    def decode(
        self,
        cache,
        mask: torch.Tensor,
        logits: torch.Tensor,
        filled: int,
        max_new_tokens: int,
        keep_logits: bool = False,
    ) -> DecodeResult:
        """Greedy steps from a cache holding `filled` positions, `mask` [B, max_cache_len] marking the real ones."""
        positions = mask[:, :filled].long().sum(-1, keepdim=True)
        tokens, kept = [], []
        for step in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            if keep_logits:
                kept.append(logits.clone())
            if step == max_new_tokens - 1:
                break
            logits = self.step(cache, mask, token, filled + step, positions + step)
        return DecodeResult(torch.cat(tokens, dim=1), torch.stack(kept, dim=1) if keep_logits else None)

    @torch.no_grad()
    def step(
        self, cache, mask: torch.Tensor, token: torch.Tensor, position: int, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """One decode step writing cache position `position`; returns logits [B, V]."""
        if position >= self.max_cache_len:
            raise ValueError(f"cache position {position} is past max_cache_len ({self.max_cache_len})")
        mask[:, position] = 1
        if self._cache_position is None or self._cache_position.device != mask.device:
            self._cache_position = torch.zeros(1, dtype=torch.long, device=mask.device)
        self._cache_position.fill_(position)
        return self._step(token, mask, self._cache_position, position_ids, cache)

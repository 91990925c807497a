"""One entry point per decode op; picks the Triton kernel or the torch reference.

`backend="auto"` runs Triton on CUDA tensors, the native CPU kernels (cpu_decode.c, built at first
use) on CPU tensors where a C compiler is found, and the torch references elsewhere.
`backend="triton"` on CPU runs the kernels under the Triton interpreter (TRITON_INTERPRET=1 set
before import), which is how they are tested without a GPU. `backend="cpu"` asks for the native
kernels (label scores of 4-bit labels, selection and sparse attention, and the three fused into one
decode step; the other ops run their torch references).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .backends import BACKENDS
from .dense_attention import dense_attention_reference, dense_attention_triton
from .fused_decode import fused_decode_cpu, fused_decode_cpu_supports
from .label_append import Labels, make_labels_reference, make_labels_triton
from .label_projection import KeyProjection, LabelMap, project_keys, query_labels
from .label_scores import label_scores_cpu, label_scores_reference, label_scores_triton
from .native import native_available, require_native
from .scratch import Scratch
from .selection import select_tokens_cpu, select_tokens_reference
from .sparse_attention import (
    sparse_attention_cpu,
    sparse_attention_cpu_supports,
    sparse_attention_reference,
    sparse_attention_triton,
)


def triton_available() -> bool:
    """Whether triton imports here (the kernels then run on CUDA, or under TRITON_INTERPRET=1 on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch', 'triton' or 'cpu' for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu" if device.type == "cpu" and native_available() else "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, got {device.type}; use backend='auto' or 'triton'")
        require_native()
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs triton installed; use backend='torch' or 'auto'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' on {device.type} tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing doublesparse, or use backend='torch' or 'auto'"
        )
    return backend


def concrete_backend(backend: str, device: torch.device) -> str:
    """`backend` itself when it is already resolved ('torch', 'triton', 'cpu'); 'auto' resolved for `device`.

    The runtime resolves (and validates) the backend once per layer when a model is patched and passes
    the resolved name to every op, so the ops do not re-check it on each call.
    """
    return resolve_backend(backend, device) if backend == "auto" else backend


def make_labels(keys: torch.Tensor, channels: LabelMap, bits: int, backend: str = "auto") -> Labels:
    """Labels of new keys [B, H_kv, T, d] for label heads with `channels` [H_label, r] or a `KeyProjection`."""
    if isinstance(channels, KeyProjection):
        # Projected keys are the labels themselves: every kernel then stores all r of their lanes.
        keys, channels = project_keys(keys, channels), channels.identity_channels()
    if concrete_backend(backend, keys.device) == "triton":
        return make_labels_triton(keys, channels, bits)
    return make_labels_reference(keys, channels, bits)


def label_scores(
    q_labels: torch.Tensor,
    labels: Labels,
    bits: int,
    scaling: float,
    num_select_heads: int,
    backend: str = "auto",
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """fp32 approximate scores [B, H_select, L, T] (see label_scores.py; `scratch` serves the torch path)."""
    resolved = concrete_backend(backend, q_labels.device)
    if resolved == "triton":
        return label_scores_triton(q_labels, labels, bits, scaling, num_select_heads)
    # Native scores exist for 4-bit labels (no float copy of the unpacked nibbles); 8- and 16-bit
    # labels are one torch matmul, which measured faster than a native loop did (bench kernels).
    if resolved == "cpu" and bits == 4:
        return label_scores_cpu(q_labels, labels, bits, scaling, num_select_heads, scratch)
    return label_scores_reference(q_labels, labels, bits, scaling, num_select_heads, scratch)


def select_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    backend: str = "auto",
    scratch: Optional[Scratch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, H, L, K], slot_valid [B, 1, L, K]) (see selection.py; `scratch` holds the temporaries)."""
    # On CUDA the torch ops (topk) serve both backends: fixed shapes and no host synchronisation, so
    # they are capturable in a CUDA graph; the benchmark reports selection time separately.
    if concrete_backend(backend, scores.device) == "cpu" and scores.shape[-1] < 2**32:
        return select_tokens_cpu(scores, valid, budgets, sink_tokens, recent_tokens, max_budget, scratch)
    return select_tokens_reference(scores, valid, budgets, sink_tokens, recent_tokens, max_budget, scratch)


def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    backend: str = "auto",
    scratch: Optional[Scratch] = None,
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention over the selected tokens: [B, H_q, L, d_v] (sparse_attention.py; `scratch`: torch path)."""
    resolved = concrete_backend(backend, query.device)
    if resolved == "triton":
        return sparse_attention_triton(query, keys, values, indices, slot_valid, scaling, sinks=sinks, softcap=softcap)
    # The native kernel says no to what it cannot do (sinks, softcap, value widths of their own): the
    # reference serves those calls, so backend='cpu' stays exact on every architecture.
    if resolved == "cpu" and sparse_attention_cpu_supports(query, keys, values, indices, sinks=sinks, softcap=softcap):
        return sparse_attention_cpu(query, keys, values, indices, slot_valid, scaling, scratch)
    return sparse_attention_reference(
        query, keys, values, indices, slot_valid, scaling, scratch, sinks=sinks, softcap=softcap
    )


def fused_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    channels: LabelMap,
    labels: Labels,
    bits: int,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    scaling: float,
    num_select_heads: int,
    backend: str = "auto",
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Score, select and attend (see fused_decode.py): [B, H_q, L, d]; the three ops one by one where not fused."""
    resolved = concrete_backend(backend, query.device)
    # The fused kernel hands whole rows (batch x selection heads) to threads: with fewer rows than threads
    # the separate kernels, which split each row's tokens over the threads, keep every thread busy.
    rows = query.shape[0] * num_select_heads * query.shape[2]
    if (
        resolved == "cpu"
        and not isinstance(channels, KeyProjection)  # the fused op gathers channels; projections are torch's
        and rows >= _cpu_threads()
        and fused_decode_cpu_supports(query, keys, values, channels, labels, bits, num_select_heads)
    ):
        return fused_decode_cpu(
            query,
            keys,
            values,
            channels,
            labels,
            bits,
            valid,
            budgets,
            sink_tokens,
            recent_tokens,
            max_budget,
            scaling,
            num_select_heads,
            scratch,
        )
    q_labels = query_labels(query, channels)
    scores = label_scores(q_labels, labels, bits, scaling, num_select_heads, resolved, scratch)
    indices, slot_valid = select_tokens(
        scores, valid, budgets, sink_tokens, recent_tokens, max_budget, resolved, scratch
    )
    return sparse_attention(query, keys, values, indices, slot_valid, scaling, resolved, scratch)


@torch.compiler.assume_constant_result
def _cpu_threads() -> int:
    return torch.get_num_threads()


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention over every cached key: [B, H_q, L, d_v] (see dense_attention.py)."""
    if concrete_backend(backend, query.device) == "triton":
        return dense_attention_triton(query, keys, values, scaling, valid, sinks=sinks, softcap=softcap)
    return dense_attention_reference(query, keys, values, scaling, valid, sinks=sinks, softcap=softcap)

"""One entry point per decode op; picks the Triton kernel or the torch reference.

`backend="auto"` runs Triton on CUDA tensors and the torch reference elsewhere; `backend="triton"`
on CPU runs the kernels under the Triton interpreter (TRITON_INTERPRET=1 set before import), which
is how they are tested without a GPU.
"""

from __future__ import annotations

import torch

from .label_append import Labels, make_labels_reference
from .label_scores import label_scores_reference
from .selection import select_tokens_reference
from .sparse_attention import sparse_attention_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    """Whether Triton kernels can be imported here."""
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def _triton():
    try:
        from . import triton_ops
    except ImportError as error:
        raise ValueError(
            "backend='triton' needs the Triton kernels (doublesparse.kernels.triton_ops) and triton installed; "
            "use backend='torch' or 'auto'"
        ) from error
    return triton_ops


def make_labels(keys: torch.Tensor, channels: torch.Tensor, bits: int, backend: str = "auto") -> Labels:
    """Labels of new keys [B, H_kv, T, d] for label heads with `channels` [H_label, r]."""
    if resolve_backend(backend, keys.device) == "triton":
        return _triton().make_labels(keys, channels, bits)
    return make_labels_reference(keys, channels, bits)


def label_scores(
    q_labels: torch.Tensor, labels: Labels, bits: int, scaling: float, num_select_heads: int, backend: str = "auto"
) -> torch.Tensor:
    """fp32 approximate scores [B, H_select, L, T] (see label_scores.py)."""
    if resolve_backend(backend, q_labels.device) == "triton":
        return _triton().label_scores(q_labels, labels, bits, scaling, num_select_heads)
    return label_scores_reference(q_labels, labels, bits, scaling, num_select_heads)


def select_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    sink_tokens: int,
    recent_tokens: int,
    max_budget: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, H, L, K], slot_valid [B, 1, L, K]) (see selection.py)."""
    if resolve_backend(backend, scores.device) == "triton":
        return _triton().select_tokens(scores, valid, budgets, sink_tokens, recent_tokens, max_budget)
    return select_tokens_reference(scores, valid, budgets, sink_tokens, recent_tokens, max_budget)


def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    slot_valid: torch.Tensor,
    scaling: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention over the selected tokens: [B, H_q, L, d] (see sparse_attention.py)."""
    if resolve_backend(backend, query.device) == "triton":
        return _triton().sparse_attention(query, keys, values, indices, slot_valid, scaling)
    return sparse_attention_reference(query, keys, values, indices, slot_valid, scaling)

"""What the serving engines accept of a channel mask, said honestly per model layout.

SGLang's classic Double Sparsity backend (`--enable-double-sparsity`, the authors' JSON of
`ChannelMask.to_authors_json`) loads one table per layer, `tensor(cfg[key])[:, :r]`, for every rank
alike, and uses it twice: to gather the label channels of the keys, `gather(k, 2, table)` with k
[tokens, H_kv on the rank, d] into a label buffer of H_kv rows, and to gather the query channels,
`gather(q, 2, table)` with q [batch, H_q on the rank, d]. torch.gather needs the table's rows to be at
most the keys' heads, and its output has as many heads as the table has rows; the label buffer takes
H_kv rows (or a broadcast single row). So the query labels always have H_kv rows (or one), and the
approximate scores are computed for that many query heads only, each against the KV head of the same
index. That is right exactly when H_q == H_kv (MHA) and every rank holds every head (tensor-parallel
size 1). For GQA no table shape makes it score every query head: a per-query-head table (H_q rows,
q/qk kinds) fails in the key gather, a per-KV-head table (k kind) scores only the first H_kv query
heads, each against the wrong KV head for a group larger than one.

SGLang's newer Double Sparsity is MLA-only (DeepSeek-style latent attention) and reads its own
safetensors format (`channel_selection`, `channel_weights`, [L, H, label_dim], pinned by a content
SHA-256); doublesparse does not write it, since it serves no MLA model.
"""

from __future__ import annotations

from typing import Optional

from .layout import HeadLayout


def sglang_classic_problem(layout: HeadLayout, tensor_parallel_size: int = 1) -> Optional[str]:
    """Why SGLang's classic backend cannot serve this model from the authors' JSON; None where it can."""
    if layout.num_heads != layout.num_kv_heads:
        return (
            f"SGLang's classic Double Sparsity backend cannot serve this GQA model ({layout.num_heads} query heads, "
            f"{layout.num_kv_heads} KV heads) from any channel table: it gathers the key and the query channels "
            "with one table, so it scores at most as many query heads as there are KV heads (per-query-head q/qk "
            "tables fail at the first prefill, k tables score only the first KV-head-count query heads). "
            "Serve this mask with doublesparse itself (doublesparse.apply), or use an engine that takes per-KV-head "
            "channels"
        )
    if tensor_parallel_size > 1:
        return (
            "SGLang's classic Double Sparsity backend gives every tensor-parallel rank the whole table, whose rows "
            "then outnumber the rank's heads (the key gather fails): serve this MHA model with --tp-size 1"
        )
    return None


def sglang_classic_note(layout: HeadLayout) -> str:
    """One line for the user who exports the authors' JSON: whether SGLang's classic backend serves it."""
    problem = sglang_classic_problem(layout)
    if problem is not None:
        return f"warning: {problem}"
    return (
        "note: SGLang's classic Double Sparsity backend serves this MHA model's JSON with --tp-size 1 only "
        "(every rank loads the whole table)"
    )

"""The bytes one decode step must move, dense and Double Sparsity: the byte floor of their speed-up.

Decode is bound by memory reads, so the least a step can take is the bytes it must read over the
memory bandwidth. Per step, batch included:
- weights: every parameter once (shared among the sequences of the batch), except the input
  embedding, of which only the batch's rows are read (unless it is tied to the output projection,
  which reads it whole);
- per attention layer, dense: the K and V rows of every cached token (context + the new one);
- per attention layer, Double Sparsity: the label of every cached token (codes, scale and offset)
  and the K and V rows of the tokens it attends (`SparsityConfig.budget_for`), once per selection
  head (once per KV group with group selection); its dense layers count as dense.
Query, output, scores and the new token's own writes are a few kilobytes and left out, and so is
anything an implementation adds (the scores' round trip, a gathered copy): that is what the floor
measures against. `dense bytes / Double Sparsity bytes` is the speed-up a step could reach if both
ran at the same bandwidth.
"""

from __future__ import annotations

from typing import Any


def weight_bytes(model: Any, batch: int) -> int:
    """Bytes of parameters a decode step reads: all of them, the input embedding only for `batch` rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared parameters counted once
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:  # untied: the output projection does not read it
        row = embedding.shape[1] * embedding.element_size()
        total += batch * row - embedding.numel() * embedding.element_size()
    return total


def step_bytes(
    model: Any, layout: Any, plans: Any, config: Any, method: str, batch: int, context: int, element_size: int
) -> dict[str, int]:
    """Bytes one step must move at `context` cached tokens: weights, K/V, labels, and their total.

    `plans` are the layer plans Double Sparsity would run (doublesparse.plan.layer_plans), used for
    its label heads, selection heads and dense layers; `method` is 'dense' or 'double_sparsity'.
    """
    from doublesparse.kernels.label_append import label_bytes_per_token

    if method not in ("dense", "double_sparsity"):
        raise ValueError(f"method must be 'dense' or 'double_sparsity', got {method!r}")
    tokens = context + 1  # the cache and the step's own token
    row = layout.head_dim * element_size
    kv = labels = 0
    for layer in range(layout.num_layers):
        plan = plans[layer]
        if method == "dense" or plan.dense:
            kv += 2 * batch * layout.num_kv_heads * tokens * row
            continue
        label_heads = plan.channels.shape[0]
        labels += batch * label_heads * tokens * label_bytes_per_token(config.num_channels, config.label_bits)
        reads = max(plan.num_select_heads, layout.num_kv_heads)
        kv += 2 * batch * reads * config.budget_for(tokens) * row
    weights = weight_bytes(model, batch)
    return {"weights": weights, "kv": kv, "labels": labels, "total": weights + kv + labels}

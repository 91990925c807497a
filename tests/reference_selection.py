"""An independent Double Sparsity reference for whole models: the model's own eager attention, over the keys
that a straightforward loop selects.

`reference_attention` is registered with transformers' attention interface (with the eager, additive mask).
At a decode row of a layer it makes sparse, it scores every valid key from its label written out plainly
(the key's r channels, quantized one token at a time), forces the sink, recent and current tokens, keeps
the top of the rest up to the budget, and hands the model's own `eager_attention_forward` a mask that
drops every other key. Sinks, softcapping and value widths are therefore whatever the model's eager
attention does with them: nothing of doublesparse's attention code is used.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

REFERENCE_NAME = "doublesparse_test_reference"
SPEC_ATTRIBUTE = "_doublesparse_test_reference"


def quantized(label: torch.Tensor, bits: int) -> torch.Tensor:
    """One token's label [r] as the cache stores it: fp16, or `bits`-bit codes with an fp16 scale and offset."""
    if bits == 16:
        return label.half().float()
    levels = 2**bits - 1
    scale = ((label.max() - label.min()) / levels).clamp_min(1e-8).half().float()
    offset = label.min().half().float()
    return offset + scale * torch.clamp(torch.round((label - offset) / scale), 0, levels)


def straightforward_keep(query, key, valid, channels, config, scaling) -> torch.Tensor:
    """Bool [B, H_q, T]: the keys one decode row (query [B, H_q, 1, d]) attends, chosen by plain loops."""
    batch, num_q, _, _ = query.shape
    num_kv, length = key.shape[1], key.shape[2]
    num_select = channels.shape[0]
    group = num_q // num_select
    keep = torch.zeros(batch, num_q, length, dtype=torch.bool)
    for b in range(batch):
        positions = [t for t in range(length) if valid[b, t]]
        n = len(positions)
        budget = config.budget_for(n)
        recent = min(max(config.recent_tokens, 1), budget)
        sinks = min(config.sink_tokens, budget - recent)
        forced = set(positions[n - recent :]) | set(positions[:sinks])
        for s in range(num_select):
            kv = s * num_kv // num_select
            heads = range(s * group, (s + 1) * group)
            scores = {}
            for t in positions:
                label = quantized(key[b, kv, t, channels[s]].float(), config.label_bits)
                scores[t] = max(float(scaling * (query[b, h, 0, channels[s]].float() * label).sum()) for h in heads)
            rest = sorted((t for t in positions if t not in forced), key=lambda t: -scores[t])
            chosen = sorted(forced) + rest[: budget - len(forced)]
            for h in heads:
                keep[b, h, chosen] = True
    return keep


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention-interface function: the model's eager attention, with unselected keys masked at decode rows."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    spec = getattr(module, SPEC_ATTRIBUTE, None)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if spec is not None and query.shape[2] == 1 and key.shape[2] > 1:
        channels, config = spec
        lowest = torch.finfo(attention_mask.dtype).min
        valid = attention_mask[:, 0, -1, : key.shape[2]] > lowest / 2
        keep = straightforward_keep(query, key, valid, channels, config, scaling)
        attention_mask = attention_mask[..., : key.shape[2]] + torch.where(keep[:, :, None], 0.0, lowest).to(
            attention_mask.dtype
        )
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def reference_patched(model, channels_by_layer, config):
    """Inside: `model` attends through `reference_attention`; layers in `channels_by_layer` select sparsely."""
    AttentionInterface.register(REFERENCE_NAME, reference_attention)
    AttentionMaskInterface.register(REFERENCE_NAME, eager_mask)
    previous = model.config._attn_implementation
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")]
    for module in modules:
        if module.layer_idx in channels_by_layer:
            setattr(module, SPEC_ATTRIBUTE, (channels_by_layer[module.layer_idx], config))
    model.set_attn_implementation(REFERENCE_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, SPEC_ATTRIBUTE):
                delattr(module, SPEC_ATTRIBUTE)

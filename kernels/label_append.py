"""Label append: gather the r chosen channels of new keys and store them compactly.

Label storage, per layer (the layout every other op reads):
    codes:  [B, H_label, T, r]      in the label dtype (16-bit labels)
            [B, H_label, T, r]      uint8 (8-bit labels)
            [B, H_label, T, r // 2] uint8 (4-bit labels; channel 2j in the low nibble, 2j+1 in the high)
    scale, offset: [B, H_label, T] float16 (8- and 4-bit labels only; None for 16-bit labels)
A label dequantizes as `offset + scale * code`: asymmetric min/max quantization per token and head.

`H_label` is the number of label heads: one per KV head, or one per query head when a per-query-head
channel mask is used with per-head selection. Label head `h` reads KV head `h // (H_label // H_kv)`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

SCALE_DTYPE = torch.float16


class Labels(NamedTuple):
    """Compact labels of a span of tokens (see the module docstring for the layout)."""

    codes: torch.Tensor
    scale: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]


def label_dtype_for(key_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of 16-bit labels: the keys' own 16-bit dtype, fp16 for wider keys."""
    return key_dtype if key_dtype in (torch.float16, torch.bfloat16) else torch.float16


def gather_label_channels(keys: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Channels `channels[h]` of the keys read by label head h: [B, H_kv, T, d] -> [B, H_label, T, r]."""
    num_label_heads, _ = channels.shape
    num_kv_heads = keys.shape[1]
    if num_label_heads % num_kv_heads:
        raise ValueError(f"{num_label_heads} label heads cannot share {num_kv_heads} KV heads evenly")
    per_kv = num_label_heads // num_kv_heads
    if per_kv > 1:
        keys = keys.repeat_interleave(per_kv, dim=1)
    index = channels.to(keys.device)[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
    return torch.gather(keys, 3, index)


def quantize_labels(labels: torch.Tensor, bits: int) -> Labels:
    """Quantize float labels [..., r] to `bits` (16, 8 or 4); see the module docstring."""
    if bits == 16:
        return Labels(labels.to(label_dtype_for(labels.dtype)), None, None)
    if bits not in (8, 4):
        raise ValueError(f"label bits must be 16, 8 or 4, got {bits}")
    levels = (1 << bits) - 1
    x = labels.float()
    low = x.amin(dim=-1)
    high = x.amax(dim=-1)
    # Round scale and offset to their storage dtype first, then quantize against the stored values,
    # so dequantization error stays within half a step.
    scale = ((high - low) / levels).clamp_min(1e-8).to(SCALE_DTYPE)
    offset = low.to(SCALE_DTYPE)
    codes = torch.round((x - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Labels(codes, scale, offset)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., r] from stored uint8 codes (unpacks 4-bit pairs)."""
    if bits == 8:
        return codes
    low = codes & 0x0F
    high = codes >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_labels(labels: Labels, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float labels [..., r] from stored labels."""
    if bits == 16:
        return labels.codes.to(dtype)
    codes = unpack_codes(labels.codes, bits).float()
    return (labels.offset.float()[..., None] + labels.scale.float()[..., None] * codes).to(dtype)


def make_labels_reference(keys: torch.Tensor, channels: torch.Tensor, bits: int) -> Labels:
    """Torch reference of label append: gather the label channels of new keys and quantize them."""
    return quantize_labels(gather_label_channels(keys, channels), bits)


def label_bytes_per_token(num_channels: int, bits: int) -> int:
    """Bytes one token's label takes in one label head, scale and offset included."""
    if bits == 16:
        return 2 * num_channels
    return num_channels * bits // 8 + 2 * torch.finfo(SCALE_DTYPE).bits // 8

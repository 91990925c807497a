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

try:  # the torch references must import where triton is missing (e.g. macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

SCALE_DTYPE = torch.float16
# The smallest positive fp16 (a subnormal): a constant label (max == min) still gets a usable scale,
# where a 1e-8 floor would round to 0 in fp16 and make its codes NaN.
SMALLEST_SCALE = 2.0**-24


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
    scale = ((high - low) / levels).to(SCALE_DTYPE).clamp_min(SMALLEST_SCALE)
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


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # torch.round rounds halves to even; floor(x + 0.5) alone would round them up.
        rounded = tl.floor(x + 0.5)
        is_tie = (rounded - x) == 0.5
        is_odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) == 1.0
        return tl.where(is_tie & is_odd, rounded - 1.0, rounded)

    @triton.jit
    def _quantize_codes(x, offset, scale, LEVELS: tl.constexpr):
        # IEEE division (div_rn) so the codes match torch's exactly on the GPU too.
        codes = _round_half_even(tl.math.div_rn(x - offset[:, None], scale[:, None]))
        return tl.minimum(tl.maximum(codes, 0.0), LEVELS).to(tl.uint8)

    @triton.jit
    def _label_append_kernel(
        keys_ptr,
        channels_ptr,
        codes_ptr,
        scale_ptr,
        offset_ptr,
        num_tokens,
        labels_per_kv,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_ch,
        stride_cc,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_oc,
        stride_sb,
        stride_sh,
        stride_st,
        NUM_CHANNELS: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        block_t = tl.program_id(0)
        label_head = tl.program_id(1)
        batch = tl.program_id(2)
        kv_head = label_head // labels_per_kv
        tokens = block_t * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < num_tokens
        keys_row = keys_ptr + batch * stride_kb + kv_head * stride_kh + tokens[:, None] * stride_kt
        # 4-bit labels are built from their even and odd channels separately: they share one byte.
        if BITS == 4:
            pairs = tl.arange(0, BLOCK_C)
            pair_ok = pairs < NUM_CHANNELS // 2
            even_channels = tl.load(
                channels_ptr + label_head * stride_ch + (2 * pairs) * stride_cc, mask=pair_ok, other=0
            )
            odd_channels = tl.load(
                channels_ptr + label_head * stride_ch + (2 * pairs + 1) * stride_cc, mask=pair_ok, other=0
            )
            both_ok = token_ok[:, None] & pair_ok[None, :]
            even = tl.load(keys_row + even_channels[None, :] * stride_kd, mask=both_ok, other=0.0).to(tl.float32)
            odd = tl.load(keys_row + odd_channels[None, :] * stride_kd, mask=both_ok, other=0.0).to(tl.float32)
            # Padding lanes must not win min/max; padding tokens read zeros and are never stored.
            pair_ok_2d = pair_ok[None, :]
            low = tl.minimum(
                tl.min(tl.where(pair_ok_2d, even, float("inf")), axis=1),
                tl.min(tl.where(pair_ok_2d, odd, float("inf")), axis=1),
            )
            high = tl.maximum(
                tl.max(tl.where(pair_ok_2d, even, -float("inf")), axis=1),
                tl.max(tl.where(pair_ok_2d, odd, -float("inf")), axis=1),
            )
            scale = tl.maximum(
                tl.math.div_rn(high - low, 15.0).to(tl.float16).to(tl.float32), 5.960464477539063e-08
            )  # SMALLEST_SCALE
            offset = low.to(tl.float16).to(tl.float32)
            packed = _quantize_codes(even, offset, scale, 15) | (_quantize_codes(odd, offset, scale, 15) << 4)
            out = (
                codes_ptr
                + batch * stride_ob
                + label_head * stride_oh
                + tokens[:, None] * stride_ot
                + pairs[None, :] * stride_oc
            )
            tl.store(out, packed, mask=both_ok)
        else:
            lanes = tl.arange(0, BLOCK_C)
            lane_ok = lanes < NUM_CHANNELS
            channels = tl.load(channels_ptr + label_head * stride_ch + lanes * stride_cc, mask=lane_ok, other=0)
            both_ok = token_ok[:, None] & lane_ok[None, :]
            x = tl.load(keys_row + channels[None, :] * stride_kd, mask=both_ok, other=0.0)
            out = (
                codes_ptr
                + batch * stride_ob
                + label_head * stride_oh
                + tokens[:, None] * stride_ot
                + lanes[None, :] * stride_oc
            )
            if BITS == 16:
                tl.store(out, x.to(codes_ptr.dtype.element_ty), mask=both_ok)
            else:
                x = x.to(tl.float32)
                low = tl.min(tl.where(lane_ok[None, :], x, float("inf")), axis=1)
                high = tl.max(tl.where(lane_ok[None, :], x, -float("inf")), axis=1)
                scale = tl.maximum(
                    tl.math.div_rn(high - low, 255.0).to(tl.float16).to(tl.float32), 5.960464477539063e-08
                )  # SMALLEST_SCALE
                offset = low.to(tl.float16).to(tl.float32)
                tl.store(out, _quantize_codes(x, offset, scale, 255), mask=both_ok)
        if BITS != 16:
            stats = batch * stride_sb + label_head * stride_sh + tokens * stride_st
            tl.store(scale_ptr + stats, scale.to(tl.float16), mask=token_ok)
            tl.store(offset_ptr + stats, offset.to(tl.float16), mask=token_ok)


def make_labels_triton(
    keys: torch.Tensor, channels: torch.Tensor, bits: int, out: Optional[Labels] = None, block_tokens: int = 64
) -> Labels:
    """Triton label append: same codes, scale and offset as `make_labels_reference`.

    `out` may give the storage to write (e.g. a slice of a preallocated label cache); it is returned.
    """
    if triton is None:
        raise ValueError("make_labels_triton needs triton installed; use backend='torch'")
    if bits not in (16, 8, 4):
        raise ValueError(f"label bits must be 16, 8 or 4, got {bits}")
    batch, num_kv_heads, num_tokens, _ = keys.shape
    num_label_heads, num_channels = channels.shape
    if num_label_heads % num_kv_heads:
        raise ValueError(f"{num_label_heads} label heads cannot share {num_kv_heads} KV heads evenly")
    if bits == 4 and num_channels % 2:
        raise ValueError(f"4-bit labels pack channel pairs: use an even number of channels, got {num_channels}")
    channels = channels.to(device=keys.device, dtype=torch.int64)
    code_width = num_channels // 2 if bits == 4 else num_channels
    code_dtype = label_dtype_for(keys.dtype) if bits == 16 else torch.uint8
    if out is None:
        codes = torch.empty(batch, num_label_heads, num_tokens, code_width, dtype=code_dtype, device=keys.device)
        scale = offset = None
        if bits != 16:
            scale = torch.empty(batch, num_label_heads, num_tokens, dtype=SCALE_DTYPE, device=keys.device)
            offset = torch.empty_like(scale)
    else:
        codes, scale, offset = out
        if codes.shape != (batch, num_label_heads, num_tokens, code_width) or codes.dtype != code_dtype:
            raise ValueError(
                f"out.codes must be {code_dtype} of shape {(batch, num_label_heads, num_tokens, code_width)}"
            )
        if bits != 16 and (
            scale is None or offset is None or scale.shape != codes.shape[:3] or offset.stride() != scale.stride()
        ):
            raise ValueError(
                f"out.scale and out.offset must be {SCALE_DTYPE} of shape {tuple(codes.shape[:3])} with equal strides"
            )
    if codes.numel() == 0:
        return Labels(codes, scale, offset)
    stats = scale if scale is not None else codes  # unused by the kernel for 16-bit labels
    stats_strides = scale.stride() if scale is not None else (0, 0, 0)
    grid = (triton.cdiv(num_tokens, block_tokens), num_label_heads, batch)
    _label_append_kernel[grid](
        keys,
        channels,
        codes,
        stats,
        offset if offset is not None else stats,
        num_tokens,
        num_label_heads // num_kv_heads,
        *keys.stride(),
        *channels.stride(),
        *codes.stride(),
        *stats_strides,
        NUM_CHANNELS=num_channels,
        BITS=bits,
        BLOCK_T=block_tokens,
        BLOCK_C=triton.next_power_of_2(code_width),
    )
    return Labels(codes, scale, offset)

"""Label scores: approximate attention logits of every cached token from its label.

For query head h reading label head g = h // (H_q // H_label):
    score[b, h, i, n] = scaling * sum_c q_labels[b, h, i, c] * label[b, g, n, c]
With `group_reduce`, the heads that share a selection head (H_q // H_select of them) are reduced by
their maximum, so one selection serves a whole KV group: a token is kept when any query head of the
group would rank it high.

Integer labels are scored without dequantizing them: with label = offset + scale * code,
    q . label = scale * (q . code) + offset * sum(q).
Every cached token is scored, padding included: ragged batches rely on selection, which never picks
an invalid key (see selection.py), so no length input is needed here.
"""

from __future__ import annotations

from typing import Optional

import torch

from .label_append import Labels
from .scratch import Scratch, scratch_or_new

try:  # the torch reference must import where triton is missing (e.g. macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


def gather_query_channels(query: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The label channels of each query head: [B, H_q, L, d] -> [B, H_q, L, r]."""
    num_q_heads = query.shape[1]
    num_label_heads = channels.shape[0]
    per_label = num_q_heads // num_label_heads
    per_query = channels.to(query.device).repeat_interleave(per_label, dim=0)
    index = per_query[None, :, None, :].expand(query.shape[0], -1, query.shape[2], -1)
    return torch.gather(query, 3, index)


def _check_heads(num_q_heads: int, num_label_heads: int, num_select_heads: int) -> None:
    if num_q_heads % num_label_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_label_heads} label heads evenly")
    if num_q_heads % num_select_heads:
        raise ValueError(f"{num_q_heads} query heads cannot be reduced into {num_select_heads} selection heads")


@torch.no_grad()  # scores only rank tokens for a discrete selection; with autograd on, out= would fail
def label_scores_reference(
    q_labels: torch.Tensor,
    labels: Labels,
    bits: int,
    scaling: float,
    num_select_heads: Optional[int] = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Torch reference: fp32 scores [B, H_select, L, T] of T cached labels for L query rows.

    q_labels: [B, H_q, L, r]; labels: codes [B, H_label, T, ...]. `num_select_heads` (default H_q)
    divides H_q; consecutive query heads are max-reduced into one selection head. With `scratch`,
    every temporary and the result live in its buffers (see scratch.py).
    """
    batch, num_q_heads, rows, num_channels = q_labels.shape
    num_label_heads, num_tokens = labels.codes.shape[1], labels.codes.shape[2]
    heads = num_select_heads or num_q_heads
    _check_heads(num_q_heads, num_label_heads, heads)
    if bits not in (16, 8, 4):
        raise ValueError(f"label bits must be 16, 8 or 4, got {bits}")
    per_label = num_q_heads // num_label_heads
    device = q_labels.device
    # The query heads of one label head side by side: one matmul per label head, labels never repeated.
    queries = q_labels.float().reshape(batch, num_label_heads, per_label * rows, num_channels)
    dots = scratch_or_new(scratch, "scores_dots", (*queries.shape[:3], num_tokens), torch.float32, device)
    if bits in (16, 8):
        torch.matmul(queries, _as_float(labels.codes, scratch, "scores_codes").transpose(-1, -2), out=dots)
    else:  # channel 2j is the low nibble, 2j+1 the high one: unpacked side by side, one matmul
        nibbles = scratch_or_new(scratch, "scores_nibbles", labels.codes.shape, torch.uint8, device)
        unpacked = scratch_or_new(scratch, "scores_unpacked", (*labels.codes.shape, 2), torch.float32, device)
        unpacked[..., 0].copy_(torch.bitwise_and(labels.codes, 0x0F, out=nibbles))
        unpacked[..., 1].copy_(torch.bitwise_right_shift(labels.codes, 4, out=nibbles))
        torch.matmul(queries, unpacked.view(*labels.codes.shape[:3], num_channels).transpose(-1, -2), out=dots)
    if bits in (8, 4):
        # label = offset + scale * code, so q . label = scale * (q . code) + offset * sum(q).
        dots.mul_(_as_float(labels.scale, scratch, "scores_scale")[:, :, None, :])
        offset = _as_float(labels.offset, scratch, "scores_offset")[:, :, None, :]
        offset_term = scratch_or_new(scratch, "scores_offset_term", dots.shape, torch.float32, device)
        dots.add_(torch.mul(offset, queries.sum(dim=-1, keepdim=True), out=offset_term))
    scores = dots.mul_(scaling).view(batch, num_q_heads, rows, num_tokens)
    if heads != num_q_heads:
        grouped = scores.view(batch, heads, num_q_heads // heads, rows, num_tokens)
        reduced = scratch_or_new(scratch, "scores_reduced", (batch, heads, rows, num_tokens), torch.float32, device)
        scores = torch.amax(grouped, dim=2, out=reduced)
    return scores


def _code_width(codes: torch.Tensor, bits: int, num_channels: int) -> int:
    """Code lanes per label (r, or r / 2 packed nibbles); ValueError if the labels hold another width."""
    width = num_channels // 2 if bits == 4 else num_channels
    if codes.shape[3] != width:
        raise ValueError(
            f"labels hold {codes.shape[3]} code lanes, {bits}-bit labels of {num_channels} channels need {width}"
        )
    return width


def _as_float(tensor: torch.Tensor, scratch: Optional[Scratch], name: str) -> torch.Tensor:
    if tensor.dtype == torch.float32:
        return tensor
    return scratch_or_new(scratch, name, tensor.shape, torch.float32, tensor.device).copy_(tensor)


if triton is not None:

    @triton.jit
    def _dot_rows(queries, keys):
        # [BLOCK_L, C] x [BLOCK_T, C] -> [BLOCK_L, BLOCK_T]; decode has one row, too few for tl.dot.
        return tl.sum(queries[:, None, :] * keys[None, :, :], axis=2)

    @triton.jit
    def _label_scores_kernel(
        q_ptr,
        codes_ptr,
        scale_ptr,
        offset_ptr,
        out_ptr,
        num_tokens,
        num_rows,
        num_row_blocks,
        scaling,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_qc,
        stride_cb,
        stride_ch,
        stride_ct,
        stride_cc,
        stride_sb,
        stride_sh,
        stride_st,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_ot,
        CODE_WIDTH: tl.constexpr,
        BITS: tl.constexpr,
        QUERY_PER_LABEL: tl.constexpr,
        LABELS_PER_PROGRAM: tl.constexpr,
        SELECTS_PER_LABEL: tl.constexpr,
        HEADS_PER_SELECT_IN_LABEL: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program owns whole label heads: each label tile is loaded once and scored against every
        # query head that reads it, then max-reduced into the selection heads it feeds.
        block_t = tl.program_id(0)
        unit = tl.program_id(1)
        batch = tl.program_id(2) // num_row_blocks
        row_block = tl.program_id(2) % num_row_blocks
        rows = row_block * BLOCK_L + tl.arange(0, BLOCK_L)
        row_ok = rows < num_rows
        tokens = block_t * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < num_tokens
        lanes = tl.arange(0, BLOCK_C)
        lane_ok = lanes < CODE_WIDTH
        best = tl.full((BLOCK_L, BLOCK_T), -float("inf"), tl.float32)
        for lab in tl.static_range(LABELS_PER_PROGRAM):
            label_head = unit * LABELS_PER_PROGRAM + lab
            label_rows = codes_ptr + batch * stride_cb + label_head * stride_ch + tokens[:, None] * stride_ct
            codes = tl.load(label_rows + lanes[None, :] * stride_cc, mask=token_ok[:, None] & lane_ok[None, :], other=0)
            if BITS == 4:
                low_codes = (codes & 0x0F).to(tl.float32)
                high_codes = (codes >> 4).to(tl.float32)
            else:
                codes = codes.to(tl.float32)
            if BITS != 16:
                stats = batch * stride_sb + label_head * stride_sh + tokens * stride_st
                scale = tl.load(scale_ptr + stats, mask=token_ok, other=0.0).to(tl.float32)
                offset = tl.load(offset_ptr + stats, mask=token_ok, other=0.0).to(tl.float32)
            for sel in tl.static_range(SELECTS_PER_LABEL):
                if SELECTS_PER_LABEL > 1:
                    best = tl.full((BLOCK_L, BLOCK_T), -float("inf"), tl.float32)
                for j in tl.static_range(HEADS_PER_SELECT_IN_LABEL):
                    q_head = label_head * QUERY_PER_LABEL + sel * HEADS_PER_SELECT_IN_LABEL + j
                    q_rows = q_ptr + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_ql
                    q_ok = row_ok[:, None] & lane_ok[None, :]
                    if BITS == 4:
                        q_even = tl.load(q_rows + (2 * lanes[None, :]) * stride_qc, mask=q_ok, other=0.0).to(tl.float32)
                        q_odd = tl.load(q_rows + (2 * lanes[None, :] + 1) * stride_qc, mask=q_ok, other=0.0).to(
                            tl.float32
                        )
                        dots = _dot_rows(q_even, low_codes) + _dot_rows(q_odd, high_codes)
                        q_sum = tl.sum(q_even, axis=1) + tl.sum(q_odd, axis=1)
                    else:
                        queries = tl.load(q_rows + lanes[None, :] * stride_qc, mask=q_ok, other=0.0).to(tl.float32)
                        dots = _dot_rows(queries, codes)
                        q_sum = tl.sum(queries, axis=1)
                    if BITS != 16:
                        dots = scale[None, :] * dots + offset[None, :] * q_sum[:, None]
                    best = tl.maximum(best, dots * scaling)
                if SELECTS_PER_LABEL > 1:
                    select_head = label_head * SELECTS_PER_LABEL + sel
                    out = (
                        out_ptr
                        + batch * stride_ob
                        + select_head * stride_oh
                        + rows[:, None] * stride_ol
                        + tokens[None, :] * stride_ot
                    )
                    tl.store(out, best, mask=row_ok[:, None] & token_ok[None, :])
        if SELECTS_PER_LABEL == 1:
            out = (
                out_ptr + batch * stride_ob + unit * stride_oh + rows[:, None] * stride_ol + tokens[None, :] * stride_ot
            )
            tl.store(out, best, mask=row_ok[:, None] & token_ok[None, :])


def label_scores_triton(
    q_labels: torch.Tensor,
    labels: Labels,
    bits: int,
    scaling: float,
    num_select_heads: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    block_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Triton label scores: same result as `label_scores_reference` (fp32 [B, H_select, L, T], or into `out`)."""
    if triton is None:
        raise ValueError("label_scores_triton needs triton installed; use backend='torch'")
    if bits not in (16, 8, 4):
        raise ValueError(f"label bits must be 16, 8 or 4, got {bits}")
    batch, num_q_heads, rows, num_channels = q_labels.shape
    codes = labels.codes
    num_label_heads, num_tokens = codes.shape[1], codes.shape[2]
    heads = num_select_heads or num_q_heads
    _check_heads(num_q_heads, num_label_heads, heads)
    per_label = num_q_heads // num_label_heads
    per_select = num_q_heads // heads
    if per_select > per_label and per_select % per_label:
        raise ValueError(f"a selection head of {per_select} query heads must cover whole label heads of {per_label}")
    expected_width = _code_width(codes, bits, num_channels)
    if out is None:
        scores = torch.empty(batch, heads, rows, num_tokens, dtype=torch.float32, device=q_labels.device)
    elif out.shape != (batch, heads, rows, num_tokens) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be float32 of shape {(batch, heads, rows, num_tokens)}, got {out.dtype} {tuple(out.shape)}"
        )
    else:
        scores = out
    if scores.numel() == 0:
        return scores
    labels_per_program = max(1, per_select // per_label)
    block_l = min(triton.next_power_of_2(rows), 4)
    block_c = triton.next_power_of_2(expected_width)
    if block_tokens is None:
        block_tokens = max(16, min(256, 4096 // (block_l * block_c)))
    num_row_blocks = triton.cdiv(rows, block_l)
    scale = labels.scale if bits != 16 else scores
    offset = labels.offset if bits != 16 else scores
    stats_strides = labels.scale.stride() if bits != 16 else (0, 0, 0)
    grid = (triton.cdiv(num_tokens, block_tokens), num_label_heads // labels_per_program, batch * num_row_blocks)
    _label_scores_kernel[grid](
        q_labels,
        codes,
        scale,
        offset,
        scores,
        num_tokens,
        rows,
        num_row_blocks,
        float(scaling),
        *q_labels.stride(),
        *codes.stride(),
        *stats_strides,
        *scores.stride(),
        CODE_WIDTH=expected_width,
        BITS=bits,
        QUERY_PER_LABEL=per_label,
        LABELS_PER_PROGRAM=labels_per_program,
        SELECTS_PER_LABEL=max(1, per_label // per_select),
        HEADS_PER_SELECT_IN_LABEL=min(per_select, per_label),
        BLOCK_L=block_l,
        BLOCK_T=block_tokens,
        BLOCK_C=block_c,
    )
    return scores


def label_scores_cpu(
    q_labels: torch.Tensor,
    labels: Labels,
    bits: int,
    scaling: float,
    num_select_heads: Optional[int] = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Native CPU scores of 4-bit labels (cpu_decode.c): same result as `label_scores_reference`, no unpacked copy."""
    from . import native, native_ops  # native_ops registers the ops; the library is built at first use

    native.require_native()
    if bits != 4:
        raise ValueError(
            f"native label scores take 4-bit labels, got {bits}-bit ones; "
            "8- and 16-bit labels run label_scores_reference"
        )
    batch, num_q_heads, rows, num_channels = q_labels.shape
    codes = labels.codes
    num_label_heads, num_tokens = codes.shape[1], codes.shape[2]
    heads = num_select_heads or num_q_heads
    _check_heads(num_q_heads, num_label_heads, heads)
    if codes.dtype != torch.uint8 or codes.device.type != "cpu" or q_labels.device.type != "cpu":
        raise ValueError(f"native label scores take uint8 codes on the CPU, got {codes.dtype} on {codes.device}")
    _code_width(codes, bits, num_channels)
    if torch.compiler.is_compiling():  # one graph node; eager skips the dispatcher (see native_ops.py)
        op = torch.ops.doublesparse.label_scores_int4
        return op(q_labels, codes, labels.scale, labels.offset, heads, float(scaling))
    scores = scratch_or_new(scratch, "scores_native", (batch, heads, rows, num_tokens), torch.float32, codes.device)
    native_ops.label_scores_into(q_labels, codes, labels.scale, labels.offset, scaling, scores)
    return scores

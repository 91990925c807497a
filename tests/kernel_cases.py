"""Shared helpers of the kernel parity tests: random problems and the parity check."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

# The interpreter computes bf16 arithmetic wrongly; bf16 parity runs only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_only(test):
    """Mark a test `gpu` and skip it without a CUDA GPU."""
    return pytest.mark.gpu(_needs_cuda(test))


def output_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of an attention output rounded to `dtype` (fp32 accumulation in both paths)."""
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def random_channels(num_heads: int, head_dim: int, num_channels: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct random channels [num_heads, r] per head."""
    return torch.stack([torch.randperm(head_dim, generator=generator)[:num_channels] for _ in range(num_heads)]).to(
        DEVICE
    )


def randn(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values of `dtype` on the test device."""
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element written (no NaN) and within `tolerance` relative to the largest expected value."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "some outputs were never written (NaN poison left)"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def selected_per_query_head(
    indices: torch.Tensor, slot_valid: torch.Tensor, tokens: int, num_q_heads: int
) -> torch.Tensor:
    """Bool [B, H_q, L, T]: True where query head h's row selected the key, from the slots one by one."""
    batch, select_heads, rows, slots = indices.shape
    valid = slot_valid.expand(batch, select_heads, rows, slots).cpu()
    chosen = torch.zeros(batch, select_heads, rows, tokens, dtype=torch.bool)
    for b in range(batch):
        for h in range(select_heads):
            for row in range(rows):
                for slot in range(slots):
                    if valid[b, h, row, slot]:
                        chosen[b, h, row, int(indices[b, h, row, slot])] = True
    return chosen.repeat_interleave(num_q_heads // select_heads, dim=1).to(indices.device)


def attention_oracle(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: torch.Tensor,
    scaling: float,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Plain float64 attention over the `selected` [B, H_q, L, T] keys, apart from the kernels: [B, H_q, L, d_v].

    K/V are repeated per query head and every logit is formed; a sink is one more key whose logit is the
    head's sink and whose value row is zero (so it only adds to the denominator); the softmax is written
    out, and a row whose every logit is -inf gets weights 0.
    """
    batch, num_q_heads, rows, _ = query.shape
    group = num_q_heads // keys.shape[1]
    all_keys = keys.double().repeat_interleave(group, dim=1)
    all_values = values.double().repeat_interleave(group, dim=1)
    logits = torch.einsum("bhld,bhtd->bhlt", query.double(), all_keys) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = torch.where(selected, logits, float("-inf"))
    if sinks is not None:
        sink_column = sinks.double().view(1, num_q_heads, 1, 1).expand(batch, -1, rows, 1)
        logits = torch.cat([logits, sink_column], dim=-1)
        zero_row = all_values.new_zeros(batch, num_q_heads, 1, values.shape[-1])
        all_values = torch.cat([all_values, zero_row], dim=2)
    top = logits.amax(dim=-1, keepdim=True)
    exps = torch.exp(logits - torch.where(top == float("-inf"), 0.0, top))
    total = exps.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, exps / torch.where(total > 0, total, 1.0), 0.0)
    return torch.einsum("bhlt,bhtd->bhld", weights, all_values)


def assert_matches_oracle(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` is of `dtype`, fully written, and within the dtype's tolerance of the float64 oracle."""
    assert actual.dtype == dtype and actual.shape == oracle.shape, (actual.dtype, actual.shape, oracle.shape)
    assert not actual.isnan().any(), "some outputs were never written (NaN poison left)"
    scale = oracle.abs().max().clamp_min(1e-6)
    error = ((actual.double() - oracle).abs().max() / scale).item()
    assert error <= output_tolerance(dtype), f"relative error {error:.2e} > {output_tolerance(dtype):.0e}"


# Sparse-attention problems shared by the kernel tests.
CASES = [
    # batch, query heads, kv heads, selection heads, rows, head_dim, tokens, budget, splits
    (2, 8, 2, 2, 1, 64, 100, 37, 3),  # GQA group 4, one selection per group, ragged split tail
    (1, 8, 1, 1, 1, 128, 300, 150, None),  # group 8, default splits
    (2, 2, 2, 2, 1, 128, 40, 40, 2),  # group 1 (MHA)
    (1, 8, 2, 8, 1, 64, 70, 23, 2),  # selection per query head
    (1, 4, 2, 2, 2, 80, 50, 9, 1),  # two query rows, head_dim 80 (masked lanes)
]


def random_problem(case: tuple, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """A sparse-attention problem of `case` (one of CASES): query, keys, values, indices, slot_valid."""
    batch, q_heads, kv_heads, select_heads, rows, head_dim, tokens, budget, _ = case
    generator = torch.Generator().manual_seed(seed)
    query = randn(batch, q_heads, rows, head_dim, dtype=dtype, generator=generator)
    keys = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, generator=generator)
    values = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, generator=generator)
    picks = [torch.randperm(tokens, generator=generator)[:budget] for _ in range(batch * select_heads * rows)]
    indices = torch.stack(picks).view(batch, select_heads, rows, budget).to(DEVICE)
    # Ragged budgets: each batch row keeps a different number of leading slots; row 0 of the last
    # batch element keeps none and must come out as zeros.
    kept = torch.randint(1, budget + 1, (batch, rows), generator=generator)
    kept[-1, 0] = 0
    slot_valid = (torch.arange(budget)[None, None] < kept[..., None])[:, None].to(DEVICE)
    return query, keys, values, indices, slot_valid

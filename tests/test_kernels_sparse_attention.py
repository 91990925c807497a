"""Parity of the Triton sparse (split-K flash-decoding) attention with its torch reference."""

import pytest
import torch

from doublesparse.kernels.sparse_attention import (
    _sparse_attention_per_query_head,
    sparse_attention_reference,
    sparse_attention_triton,
)
from kernel_cases import DEVICE, DTYPES, assert_close, cuda_only, output_tolerance, randn

CASES = [
    # batch, query heads, kv heads, selection heads, rows, head_dim, tokens, budget, splits
    (2, 8, 2, 2, 1, 64, 100, 37, 3),      # GQA group 4, one selection per group, ragged split tail
    (1, 8, 1, 1, 1, 128, 300, 150, None),  # group 8, default splits
    (2, 2, 2, 2, 1, 128, 40, 40, 2),       # group 1 (MHA)
    (1, 8, 2, 8, 1, 64, 70, 23, 2),        # selection per query head
    (1, 4, 2, 2, 2, 80, 50, 9, 1),         # two query rows, head_dim 80 (masked lanes)
]


def random_problem(case, dtype, seed):
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_matches_reference(case, dtype):
    query, keys, values, indices, slot_valid = random_problem(case, dtype, seed=sum(case[:8]))
    expected = sparse_attention_reference(query, keys, values, indices, slot_valid, 0.1)
    out = torch.full_like(query, float("nan"))
    actual = sparse_attention_triton(query, keys, values, indices, slot_valid, 0.1, out=out, num_splits=case[-1])
    assert actual is out
    assert_close(actual, expected, output_tolerance(dtype))
    assert (actual[-1, :, 0] == 0).all(), "a row with no valid slot must return zeros"


@pytest.mark.parametrize("case", CASES)
def test_grouped_reference_matches_plain_reference(case):
    query, keys, values, indices, slot_valid = random_problem(case, torch.float32, seed=1)
    expected = _sparse_attention_per_query_head(query, keys, values, indices, slot_valid, 0.1)
    torch.testing.assert_close(sparse_attention_reference(query, keys, values, indices, slot_valid, 0.1), expected)


def test_sparse_attention_rejects_selection_heads_across_kv_heads():
    query, keys, values, indices, slot_valid = random_problem((1, 8, 4, 2, 1, 64, 10, 4, 1), torch.float32, seed=0)
    with pytest.raises(ValueError, match="H_select"):
        sparse_attention_triton(query, keys, values, indices, slot_valid, 0.1)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, select_heads", [(128, 8), (64, 32)])
def test_sparse_attention_at_model_shape_on_gpu(dtype, head_dim, select_heads):
    # Llama-3.1-8B attention at 32K context, budget 1/16 (+1: a ragged tail), default splits.
    case = (2, 32, 8, select_heads, 1, head_dim, 32768, 2049, None)
    query, keys, values, indices, slot_valid = random_problem(case, dtype, seed=7)
    expected = sparse_attention_reference(query, keys, values, indices, slot_valid, head_dim**-0.5)
    out = torch.full_like(query, float("nan"))
    actual = sparse_attention_triton(query, keys, values, indices, slot_valid, head_dim**-0.5, out=out)
    assert_close(actual, expected, output_tolerance(dtype))

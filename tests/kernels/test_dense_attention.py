"""Parity of the Triton dense flash-decoding attention with its torch reference, SDPA and an oracle."""

import pytest
import torch
import torch.nn.functional as F

from doublesparse.kernels.dense_attention import dense_attention_reference, dense_attention_triton

from kernel_cases import (
    DEVICE,
    DTYPES,
    assert_close,
    assert_matches_oracle,
    attention_oracle,
    cuda_only,
    output_tolerance,
    randn,
)

CASES = [
    # batch, query heads, kv heads, rows, head_dim, tokens, splits
    (2, 8, 2, 1, 64, 100, 3),
    (1, 8, 1, 1, 128, 257, None),
    (1, 4, 4, 2, 128, 33, 1),
]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_dense_attention_matches_reference(case, dtype, ragged):
    batch, q_heads, kv_heads, rows, head_dim, tokens, splits = case
    generator = torch.Generator().manual_seed(sum(case[:6]))
    query = randn(batch, q_heads, rows, head_dim, dtype=dtype, generator=generator)
    keys = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, generator=generator)
    values = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, generator=generator)
    valid = None
    if ragged:  # left padding of a different width per batch row; the last row sees nothing
        starts = torch.randint(0, tokens, (batch, 1, 1), generator=generator)
        valid = (torch.arange(tokens)[None, None] >= starts).expand(batch, rows, tokens).clone()
        valid[-1] = False
        valid = valid.to(DEVICE)
    expected = dense_attention_reference(query, keys, values, 0.1, valid)
    out = torch.full_like(query, float("nan"))
    actual = dense_attention_triton(query, keys, values, 0.1, valid, out=out, num_splits=splits)
    assert_close(actual, expected, output_tolerance(dtype))
    if ragged:
        assert (actual[-1] == 0).all()


def test_dense_reference_matches_sdpa():
    generator = torch.Generator().manual_seed(0)
    query = randn(2, 8, 1, 64, dtype=torch.float32, generator=generator)
    keys = randn(2, 2, 50, 64, dtype=torch.float32, generator=generator)
    values = randn(2, 2, 50, 64, dtype=torch.float32, generator=generator)
    expected = F.scaled_dot_product_attention(
        query, keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1), scale=0.1
    )
    torch.testing.assert_close(dense_attention_reference(query, keys, values, 0.1), expected, atol=1e-5, rtol=1e-5)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_attention_at_model_shape_on_gpu(dtype):
    generator = torch.Generator().manual_seed(3)
    query = randn(2, 32, 1, 128, dtype=dtype, generator=generator)
    keys = randn(2, 8, 32768 + 5, 128, dtype=dtype, generator=generator)
    values = randn(2, 8, 32768 + 5, 128, dtype=dtype, generator=generator)
    expected = dense_attention_reference(query, keys, values, 128**-0.5)
    assert_close(dense_attention_triton(query, keys, values, 128**-0.5), expected, output_tolerance(dtype))


# Sinks (gpt-oss), softcapping (Gemma2) and values narrower than keys (MLA), against kernel_cases' oracle.
EXTENDED_CASES = [
    # batch, query heads, kv heads, rows, key dim, value dim, tokens, splits
    (2, 2, 2, 1, 48, 32, 40, 3),  # MHA
    (2, 4, 2, 1, 64, 64, 70, 2),  # GQA group 2
    (1, 8, 2, 2, 24, 16, 33, 4),  # GQA group 4, two query rows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks, softcap", [(None, None), ("sinks", None), (None, 0.5), ("sinks", 3.0)])
@pytest.mark.parametrize("case", EXTENDED_CASES)
def test_dense_attention_with_extras_matches_oracle(case, sinks, softcap, dtype):
    batch, q_heads, kv_heads, rows, key_dim, value_dim, tokens, splits = case
    generator = torch.Generator().manual_seed(sum(case[:7]))
    query = randn(batch, q_heads, rows, key_dim, dtype=dtype, generator=generator)
    keys = randn(batch, kv_heads, tokens, key_dim, dtype=dtype, generator=generator)
    values = randn(batch, kv_heads, tokens, value_dim, dtype=dtype, generator=generator)
    sinks = (2 * torch.randn(q_heads, generator=generator)).to(DEVICE) if sinks else None
    # Left padding of a different width per batch row; the last batch row sees no key at all.
    starts = torch.randint(0, tokens, (batch, 1, 1), generator=generator)
    valid = (torch.arange(tokens)[None, None] >= starts).expand(batch, rows, tokens).clone()
    valid[-1] = False
    valid = valid.to(DEVICE)
    scaling = key_dim**-0.5
    selected = valid[:, None].expand(-1, q_heads, -1, -1)
    oracle = attention_oracle(query, keys, values, selected, scaling, sinks, softcap)
    extras = dict(sinks=sinks, softcap=softcap)
    reference = dense_attention_reference(query, keys, values, scaling, valid, **extras)
    assert_matches_oracle(reference, oracle, dtype)
    assert (reference[-1] == 0).all()
    for num_splits in (1, splits):
        out = torch.full((batch, q_heads, rows, value_dim), float("nan"), dtype=dtype, device=DEVICE)
        actual = dense_attention_triton(query, keys, values, scaling, valid, out=out, num_splits=num_splits, **extras)
        assert actual is out
        assert_matches_oracle(actual, oracle, dtype)
        assert (actual[-1] == 0).all(), f"{num_splits} splits: a row with no valid key must return zeros"
    if sinks is not None and softcap is not None:  # and with no mask at all
        everything = dense_attention_triton(query, keys, values, scaling, num_splits=splits, **extras)
        oracle = attention_oracle(query, keys, values, torch.ones_like(selected), scaling, sinks, softcap)
        assert_matches_oracle(everything, oracle, dtype)

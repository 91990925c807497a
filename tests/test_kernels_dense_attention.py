"""Parity of the Triton dense flash-decoding attention with its torch reference and with SDPA."""

import pytest
import torch
import torch.nn.functional as F

from doublesparse.kernels.dense_attention import dense_attention_reference, dense_attention_triton
from kernel_cases import DEVICE, DTYPES, assert_close, cuda_only, output_tolerance, randn

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
    expected = F.scaled_dot_product_attention(query, keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1), scale=0.1)
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

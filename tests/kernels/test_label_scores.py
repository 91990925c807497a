"""Parity of the Triton label scores with their torch reference."""

import pytest
import torch

from doublesparse.kernels.label_append import make_labels_reference
from doublesparse.kernels.label_scores import label_scores_reference, label_scores_triton

from kernel_cases import DTYPES, assert_close, randn, random_channels

CASES = [
    # batch, query heads, label heads, selection heads, rows, tokens, head_dim, channels
    (1, 4, 4, 4, 1, 1, 64, 16),  # GQA group 1, one token
    (2, 8, 2, 2, 1, 77, 64, 10),  # group 4, one selection per KV group (max-reduced)
    (1, 8, 2, 8, 1, 130, 128, 32),  # group 4, selection per query head
    (1, 8, 1, 1, 3, 45, 128, 16),  # group 8, three query rows (simulate)
    (1, 8, 8, 2, 1, 50, 64, 8),  # label per query head, selection per KV group
]


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_label_scores_match_reference(case, dtype, bits):
    batch, q_heads, label_heads, select_heads, rows, tokens, head_dim, num_channels = case
    generator = torch.Generator().manual_seed(hash((case, bits)) % 2**31)
    keys = randn(batch, label_heads, tokens, head_dim, dtype=dtype, generator=generator)
    labels = make_labels_reference(keys, random_channels(label_heads, head_dim, num_channels, generator), bits)
    q_labels = randn(batch, q_heads, rows, num_channels, dtype=dtype, generator=generator)
    expected = label_scores_reference(q_labels, labels, bits, 0.125, select_heads)
    out = torch.full_like(expected, float("nan"))
    actual = label_scores_triton(q_labels, labels, bits, 0.125, select_heads, out=out)
    assert actual is out
    assert_close(actual, expected, 1e-5)


def test_label_scores_reject_mismatched_heads():
    generator = torch.Generator().manual_seed(0)
    labels = make_labels_reference(
        randn(1, 3, 4, 64, dtype=torch.float32, generator=generator), random_channels(3, 64, 8, generator), 16
    )
    with pytest.raises(ValueError, match="label heads"):
        label_scores_triton(randn(1, 8, 1, 8, dtype=torch.float32, generator=generator), labels, 16, 1.0, 8)

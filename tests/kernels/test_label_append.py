"""Parity of the Triton label append with its torch reference (exact codes, scale and offset)."""

import pytest
import torch

from doublesparse.kernels.label_append import Labels, make_labels_reference, make_labels_triton

from kernel_cases import DEVICE, DTYPES, randn, random_channels

CASES = [
    # batch, kv heads, label heads, tokens, head_dim, channels
    (1, 2, 2, 1, 64, 16),
    (2, 2, 4, 37, 64, 10),
    (1, 1, 4, 130, 128, 32),
]


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_label_append_matches_reference(case, dtype, bits):
    batch, kv_heads, label_heads, tokens, head_dim, num_channels = case
    generator = torch.Generator().manual_seed(hash((case, bits)) % 2**31)
    keys = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, generator=generator)
    channels = random_channels(label_heads, head_dim, num_channels, generator)
    expected = make_labels_reference(keys, channels, bits)
    # Poison: every element starts different from its expected value, so one left unwritten fails.

    def poison(t):
        return None if t is None else (~t if t.dtype == torch.uint8 else torch.full_like(t, float("nan")))

    actual = make_labels_triton(keys, channels, bits, out=Labels(*(poison(t) for t in expected)))
    for got, want in zip(actual, expected):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_label_append_reads_strided_keys():
    generator = torch.Generator().manual_seed(0)
    keys = randn(2, 9, 4, 64, dtype=torch.float16, generator=generator).transpose(1, 2)  # [B, H, T, d], not contiguous
    channels = random_channels(4, 64, 8, generator)
    for got, want in zip(make_labels_triton(keys, channels, 4), make_labels_reference(keys, channels, 4)):
        assert torch.equal(got, want)


def test_label_append_rejects_odd_channels_for_4_bits():
    keys = torch.zeros(1, 1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        make_labels_triton(keys, torch.arange(3, device=DEVICE)[None], 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_label_gets_finite_codes(bits):
    keys = torch.ones(1, 1, 3, 64, device=DEVICE)  # max == min: the smallest scale, codes 0
    channels = torch.arange(8, device=DEVICE)[None]
    expected = make_labels_reference(keys, channels, bits)
    assert (expected.codes == 0).all() and (expected.scale > 0).all()
    for got, want in zip(make_labels_triton(keys, channels, bits), expected):
        assert torch.equal(got, want)

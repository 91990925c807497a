"""Parity of the Triton sparse (split-K flash-decoding) attention with its torch reference, and both with an oracle."""

import pytest
import torch

from doublesparse.kernels.sparse_attention import (
    _sparse_attention_per_query_head,
    masked_attention_reference,
    sparse_attention_reference,
    sparse_attention_triton,
)

from kernel_cases import (
    CASES,
    DEVICE,
    DTYPES,
    assert_close,
    assert_matches_oracle,
    attention_oracle,
    cuda_only,
    output_tolerance,
    randn,
    random_problem,
    selected_per_query_head,
)


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


# Sinks (gpt-oss), softcapping (Gemma2) and values narrower than keys (MLA), against a plain float64
# oracle written in kernel_cases.py, not against the reference under test.
EXTENDED_CASES = [
    # batch, query heads, kv heads, selection heads, rows, key dim, value dim, tokens, budget, splits
    (2, 2, 2, 2, 1, 48, 32, 40, 17, 3),  # MHA, DeepSeek-V3-tiny widths (48 = 32 no-RoPE + 16 RoPE)
    (2, 4, 2, 2, 1, 64, 64, 50, 20, 2),  # GQA group 2, equal widths
    (1, 8, 2, 2, 2, 24, 16, 30, 11, 4),  # GQA group 4, two query rows, dims below one 16-lane block
    (1, 4, 2, 4, 1, 48, 32, 33, 9, 2),  # selection per query head
    (2, 4, 2, 4, 1, 24, 16, 20, 20, 2),  # budget = every token, per query head
]
# Selection heads spanning several KV heads: only the reference's plain per-query-head form serves them.
ACROSS_KV_CASE = (1, 4, 4, 2, 1, 24, 16, 20, 7, 1)
EXTRAS = [(None, None), ("sinks", None), (None, 2.0), ("sinks", 2.0)]


def extended_problem(case, dtype, seed, with_sinks, shared_valid=False):
    """Left-padded rows (the last batch row all padding, so none of its slots is valid), ragged budgets, and
    invalid slots pointing anywhere (padding or a repeat of a selected token): they must count for nothing."""
    batch, q_heads, kv_heads, select_heads, rows, key_dim, value_dim, tokens, budget, _ = case
    generator = torch.Generator().manual_seed(seed)
    query = randn(batch, q_heads, rows, key_dim, dtype=dtype, generator=generator)
    keys = randn(batch, kv_heads, tokens, key_dim, dtype=dtype, generator=generator)
    values = randn(batch, kv_heads, tokens, value_dim, dtype=dtype, generator=generator)
    sinks = 2 * torch.randn(q_heads, generator=generator) if with_sinks else None
    pads = torch.randint(0, tokens // 2, (batch,), generator=generator)
    pads[-1] = tokens
    valid_heads = 1 if shared_valid else select_heads
    indices = torch.randint(0, tokens, (batch, select_heads, rows, budget), generator=generator)
    slot_valid = torch.zeros(batch, valid_heads, rows, budget, dtype=torch.bool)
    kept = torch.randint(0, budget + 1, (batch, valid_heads, rows), generator=generator)
    for b in range(batch):
        for h in range(select_heads):
            for row in range(rows):
                count = min(int(kept[b, h % valid_heads, row]), tokens - int(pads[b]))
                unpadded = torch.randperm(tokens - int(pads[b]), generator=generator)
                indices[b, h, row, :count] = pads[b] + unpadded[:count]
                slot_valid[b, h % valid_heads, row, :count] = True
    sinks = None if sinks is None else sinks.to(DEVICE)
    return query, keys, values, indices.to(DEVICE), slot_valid.to(DEVICE), sinks


def extended_oracle(query, keys, values, indices, slot_valid, scaling, sinks, softcap):
    selected = selected_per_query_head(indices, slot_valid, keys.shape[2], query.shape[1])
    return attention_oracle(query, keys, values, selected, scaling, sinks, softcap), selected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks, softcap", EXTRAS)
@pytest.mark.parametrize("case", EXTENDED_CASES + [ACROSS_KV_CASE])
def test_sparse_reference_matches_oracle(case, sinks, softcap, dtype):
    query, keys, values, indices, slot_valid, sinks = extended_problem(case, dtype, sum(case[:9]), sinks == "sinks")
    scaling = case[5] ** -0.5
    oracle, selected = extended_oracle(query, keys, values, indices, slot_valid, scaling, sinks, softcap)
    actual = sparse_attention_reference(query, keys, values, indices, slot_valid, scaling, sinks=sinks, softcap=softcap)
    assert_matches_oracle(actual, oracle, dtype)
    empty_rows = ~selected.any(-1)
    assert empty_rows[-1].all() and (actual[empty_rows] == 0).all(), "a row with no valid slot must return zeros"
    masked = masked_attention_reference(
        query, keys, values, selected[:, :: case[1] // case[3]], scaling, sinks=sinks, softcap=softcap
    )
    assert_matches_oracle(masked, oracle, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks, softcap", EXTRAS)
@pytest.mark.parametrize("case", EXTENDED_CASES)
def test_sparse_triton_matches_oracle(case, sinks, softcap, dtype):
    query, keys, values, indices, slot_valid, sinks = extended_problem(
        case, dtype, sum(case[:9]), sinks == "sinks", shared_valid=case[0] == 1
    )
    scaling = case[5] ** -0.5
    oracle, selected = extended_oracle(query, keys, values, indices, slot_valid, scaling, sinks, softcap)
    for splits in (1, case[-1]):
        out = torch.full((*query.shape[:3], values.shape[-1]), float("nan"), dtype=dtype, device=DEVICE)
        actual = sparse_attention_triton(
            query, keys, values, indices, slot_valid, scaling, out=out, num_splits=splits, sinks=sinks, softcap=softcap
        )
        assert actual is out
        assert_matches_oracle(actual, oracle, dtype)
        assert (actual[~selected.any(-1)] == 0).all(), f"{splits} splits: a row with no valid slot must return zeros"


@pytest.mark.parametrize("splits", [1, 3, 12])
def test_sink_counted_once_whatever_the_splits(splits):
    # 12 slots in 12 splits: one slot per split, many splits empty (invalid or ragged): the sink must
    # still enter each row's denominator exactly once, in the merge.
    case = (2, 4, 2, 2, 1, 48, 32, 60, 12, splits)
    query, keys, values, indices, slot_valid, sinks = extended_problem(case, torch.float32, 5, True, shared_valid=True)
    sinks[0] = 30.0  # a sink far above every logit: its rows' weights all but vanish
    oracle, _ = extended_oracle(query, keys, values, indices, slot_valid, 48**-0.5, sinks, None)
    actual = sparse_attention_triton(query, keys, values, indices, slot_valid, 48**-0.5, num_splits=splits, sinks=sinks)
    assert_matches_oracle(actual, oracle, torch.float32)
    without = sparse_attention_triton(query, keys, values, indices, slot_valid, 48**-0.5, num_splits=splits)
    assert (actual.norm(dim=-1) < without.norm(dim=-1) + 1e-6).all(), "a sink only ever shrinks a row's weights"


try:
    import triton
    import triton.language as tl

    from doublesparse.kernels.flash_decode import _soft_cap
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
else:

    @triton.jit
    def _soft_cap_kernel(x_ptr, y_ptr, n, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        tl.store(y_ptr + lanes, _soft_cap(tl.load(x_ptr + lanes, mask=lanes < n), SOFTCAP), mask=lanes < n)


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_soft_cap_in_kernel_matches_torch_tanh():
    # The kernels' tanh is built from exp (see _soft_cap): within two fp32 roundings of tanh, both
    # branches and the switch between them, saturating without overflow.
    for softcap in (50.0, 2.0):
        ratios = torch.cat([torch.linspace(-0.3, 0.3, 1201), torch.logspace(-8, 3, 300), -torch.logspace(-8, 3, 300)])
        logits = (ratios * softcap).to(DEVICE)
        capped = torch.empty_like(logits)
        _soft_cap_kernel[(1,)](logits, capped, logits.numel(), SOFTCAP=softcap, BLOCK=2048)
        exact = torch.tanh(logits.double() / softcap) * softcap
        assert ((capped.double() - exact).abs() <= 2.5e-7 * softcap).all()
        assert capped.abs().max() <= softcap

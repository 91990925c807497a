"""Native CPU kernels (kernels/cpu_decode.c) against their torch references, over a shape grid."""

import numpy as np
import pytest
import torch

import doublesparse as ds
from doublesparse.decode import StaticDecoder
from doublesparse.kernels import dispatch, native
from doublesparse.kernels.label_append import make_labels_reference
from doublesparse.kernels.label_scores import label_scores_cpu, label_scores_reference
from doublesparse.kernels.selection import select_tokens_cpu, select_tokens_reference
from doublesparse.kernels.sparse_attention import sparse_attention_cpu, sparse_attention_reference

from kernel_cases import assert_close, output_tolerance
from tiny_models import left_padded_batch, random_channel_mask, tiny_model

pytestmark = pytest.mark.skipif(not native.native_available(), reason="no C compiler here: " + native.native_error())

# (query heads, label heads, selection heads): MHA, GQA with group selection, per-query-head
# labels with group selection, KV labels with per-head selection.
HEADS = [(4, 4, 4), (8, 2, 2), (8, 8, 2), (8, 2, 8)]


def integer_labels(batch, heads, length, channels, bits, generator, capacity=None):
    """Labels with small integer codes, power-of-two scales and integer queries: every product and sum is
    exact in fp32, so any summation order gives the reference's scores bit for bit."""
    capacity = capacity or length
    keys = torch.randint(-8, 8, (batch, heads, capacity, 2 * channels), generator=generator).float()
    labels = make_labels_reference(keys, torch.arange(channels).expand(heads, -1), bits)
    if bits != 16:
        labels = labels._replace(scale=torch.full_like(labels.scale, 0.5), offset=torch.full_like(labels.offset, -4.0))
    # A view of the first `length` tokens of a longer buffer, as a preallocated cache hands out.
    return type(labels)(*(t[:, :, :length] if t is not None else None for t in labels))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("length", [1, 37, 4100])
@pytest.mark.parametrize("channels", [8, 80])  # 80: more lanes than the kernel's byte tables take
def test_label_scores_match_reference(heads, rows, length, channels):
    generator = torch.Generator().manual_seed(length + channels)
    num_q, num_label, num_select = heads
    labels = integer_labels(2, num_label, length, channels, 4, generator, capacity=length + 5)
    queries = torch.randint(-3, 4, (2, num_q, rows, channels), generator=generator).float()
    expected = label_scores_reference(queries, labels, 4, 0.125, num_select)
    actual = label_scores_cpu(queries, labels, 4, 0.125, num_select)
    assert torch.equal(actual, expected)


def test_native_label_scores_take_4_bit_labels_only():
    labels = integer_labels(1, 2, 10, 8, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="4-bit"):
        label_scores_cpu(torch.zeros(1, 2, 1, 8), labels, 8, 1.0)


def selection_problem(generator, batch=3, heads=2, rows=2, length=97):
    """Scores with many exact ties, infinities and signed zeros; left padding and ragged rows."""
    scores = torch.randint(-4, 5, (batch, heads, rows, length), generator=generator).float()
    scores[0, 0, 0, :5] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e30])
    valid = torch.ones(batch, rows, length, dtype=torch.bool).tril(length - rows)
    valid[1, :, :30] = False  # left padding
    valid[2, :, 60:] = False  # a row shorter than the buffer (a preallocated cache)
    lengths = valid.sum(dim=-1)
    budgets = torch.minimum(torch.randint(1, 40, (batch, rows), generator=generator), lengths)
    return scores, valid, budgets


def chosen_sets(indices, slot_valid):
    """The set of valid slots' tokens of every row, as sorted lists."""
    keep = slot_valid.expand_as(indices).reshape(-1, indices.shape[-1])
    flat = indices.reshape(-1, indices.shape[-1])
    return [sorted(row[kept].tolist()) for row, kept in zip(flat, keep)]


@pytest.mark.parametrize("sink_tokens, recent_tokens", [(0, 0), (2, 3), (5, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_selection_matches_reference(sink_tokens, recent_tokens, seed):
    scores, valid, budgets = selection_problem(torch.Generator().manual_seed(seed))
    max_budget = int(budgets.max()) + 3  # spare slots, invalid in every row
    expected = select_tokens_reference(scores, valid, budgets, sink_tokens, recent_tokens, max_budget)
    indices, slot_valid = select_tokens_cpu(scores, valid, budgets, sink_tokens, recent_tokens, max_budget)
    assert indices.shape == expected[0].shape and torch.equal(slot_valid, expected[1])
    assert chosen_sets(indices, slot_valid) == chosen_sets(*expected)
    assert int(indices.min()) >= 0 and int(indices.max()) < scores.shape[-1]


def test_selection_with_a_broadcast_valid_mask():
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, 1, 500, generator=generator)
    valid = (torch.arange(500) < 480).expand(2, 1, 500)  # batch stride 0, as valid_keys builds it
    budgets = torch.full((2, 1), 30)
    expected = select_tokens_reference(scores, valid, budgets, 1, 4, 30)
    assert chosen_sets(*select_tokens_cpu(scores, valid, budgets, 1, 4, 30)) == chosen_sets(*expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4, 4), (8, 2, 2), (8, 2, 8)])
def test_sparse_attention_matches_reference(dtype, heads):
    generator = torch.Generator().manual_seed(2)
    num_q, num_kv, num_select = heads
    batch, length, head_dim, slots = 2, 300, 72, 40  # head_dim not a multiple of the kernel's 32 lanes
    keys = torch.randn(batch, num_kv, length + 8, head_dim, generator=generator).to(dtype)[:, :, :length]
    values = torch.randn(batch, num_kv, length + 8, head_dim, generator=generator).to(dtype)[:, :, :length]
    query = torch.randn(batch, num_q, 1, head_dim, generator=generator).to(dtype)
    indices = torch.stack([torch.randperm(length, generator=generator)[:slots] for _ in range(batch * num_select)])
    indices = indices.view(batch, num_select, 1, slots)
    slot_valid = torch.arange(slots).view(1, 1, 1, slots) < torch.tensor([slots - 7, 0]).view(batch, 1, 1, 1)
    expected = sparse_attention_reference(query, keys, values, indices, slot_valid, 0.11)
    actual = sparse_attention_cpu(query, keys, values, indices, slot_valid, 0.11)
    assert_close(actual, expected, output_tolerance(dtype) if dtype != torch.float32 else 2e-6)
    assert torch.equal(actual[1], torch.zeros_like(actual[1]))  # a row with no valid slot


@pytest.mark.parametrize("row_bytes", [8, 256, 512])
def test_the_row_read_probe_reads_exactly_the_rows_asked(row_bytes):
    from doublesparse.kernels.native_ops import read_rows

    generator = torch.Generator().manual_seed(5)
    buffer = torch.randint(0, 256, (3000, 520), dtype=torch.uint8, generator=generator)
    rows = torch.randint(0, 3000, (777,), generator=generator)  # repeats too, as a probe may draw them
    words = buffer[rows, :row_bytes].contiguous().view(torch.int64).numpy()
    expected = int(np.bitwise_xor.reduce(words.ravel()).astype(np.uint64))
    assert read_rows(buffer, rows, row_bytes) == expected
    assert read_rows(buffer, rows[:0], row_bytes) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, r, n: (b.float(), r, n), "contiguous uint8"),
        (lambda b, r, n: (b, r, 12), "multiple of 8"),
        (lambda b, r, n: (b, r, 1024), "multiple of 8 up to 520"),
        (lambda b, r, n: (b, r.int(), n), "int64"),
        (lambda b, r, n: (b, r + 3000, n), r"lie in \[0, 3000\)"),
        (lambda b, r, n: (b, r - 1, n), r"lie in \[0, 3000\)"),
    ],
)
def test_the_row_read_probe_refuses_what_would_read_outside_the_buffer(change, message):
    from doublesparse.kernels.native_ops import read_rows

    buffer, rows = torch.zeros(3000, 520, dtype=torch.uint8), torch.arange(10)
    with pytest.raises(ValueError, match=message):
        read_rows(*change(buffer, rows, 64))


def test_auto_backend_picks_the_native_kernels_on_cpu(monkeypatch):
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(native, "native_library", lambda: None)  # as where no compiler is found
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend='torch'"):
        dispatch.resolve_backend("cpu", torch.device("cpu"))


def test_library_is_built_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DOUBLESPARSE_CACHE_DIR", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler, native.FLAG_SETS[0])
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "native" and first.suffix == ".so"
    assert native._build(compiler, native.FLAG_SETS[0]) == first and first.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("native/*.partial"))


@pytest.mark.parametrize("label_bits", [16, 4])
def test_native_decode_equals_torch_decode(label_bits):
    input_ids, attention_mask = left_padded_batch([40, 29], seed=11)
    results = {}
    for backend in ("torch", "cpu"):
        model = tiny_model("llama")
        config = ds.SparsityConfig(
            num_channels=4, token_budget=0.25, label_bits=label_bits, sink_tokens=1, recent_tokens=2, backend=backend
        )
        ds.apply(model, random_channel_mask(model), config)
        results[backend] = StaticDecoder(model, max_cache_len=56).generate(
            input_ids, attention_mask, 8, keep_logits=True
        )
    assert torch.equal(results["cpu"].tokens, results["torch"].tokens)
    assert (results["cpu"].logits - results["torch"].logits).abs().max() <= 1e-4

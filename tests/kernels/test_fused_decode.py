"""The fused decode step (kernels/fused_decode.py, cpu_fused_decode.c) against the separate ops and its reference.

- Against the three separate native kernels it is a restructuring: equal bit for bit (output and the
  selection), on random inputs of every dtype and head layout.
- Against its torch reference (the composition of the three references) on integer-valued labels and
  queries, where every label score is exact in fp32: the same tokens are selected, and the attention
  agrees to fp32 rounding (the kernel accumulates in another order): `output_tolerance(dtype)`.
- The library's shortcuts change no bit: AVX-512 label scores for r = 16 (byte tables otherwise) and the
  selection's sampled floor under the threshold (every candidate ranked otherwise) give what a build
  without them gives, the selection's slot order included, also where ties are heavy or the sample lies.
"""

import pytest
import torch

from doublesparse.kernels import dispatch, native, native_ops
from doublesparse.kernels.fused_decode import fused_decode_cpu, fused_decode_cpu_supports, fused_decode_reference
from doublesparse.kernels.label_append import Labels, make_labels_reference
from doublesparse.kernels.label_scores import gather_query_channels, label_scores_cpu
from doublesparse.kernels.scratch import Scratch
from doublesparse.kernels.selection import select_tokens_reference

from kernel_cases import assert_close, output_tolerance

pytestmark = pytest.mark.skipif(not native.native_available(), reason="no C compiler here: " + native.native_error())

# (batch, query heads, KV heads, selection heads, label heads): MHA, GQA with one selection per group,
# per-query-head labels with group selection, KV labels with per-query-head selection.
LAYOUTS = [(1, 8, 8, 8, 8), (2, 8, 2, 2, 2), (2, 8, 2, 2, 8), (2, 8, 2, 8, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def problem(layout, tokens, dtype, seed, integer=False, channels=16, head_dim=64):
    """Query, K/V (views of a longer buffer, as a preallocated cache hands out), channels, labels, valid, budgets."""
    batch, num_q, num_kv, num_select, num_label = layout
    generator = torch.Generator().manual_seed(seed)
    capacity = tokens + 7
    if integer:  # small integers and power-of-two label scales: every label score is exact in fp32
        keys = torch.randint(-8, 8, (batch, num_kv, capacity, head_dim), generator=generator).to(dtype)
        query = torch.randint(-3, 4, (batch, num_q, 1, head_dim), generator=generator).to(dtype)
    else:
        keys = torch.randn(batch, num_kv, capacity, head_dim, generator=generator).to(dtype)
        query = torch.randn(batch, num_q, 1, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, num_kv, capacity, head_dim, generator=generator).to(dtype)
    rows = torch.stack([torch.randperm(head_dim, generator=generator)[:channels] for _ in range(num_label)])
    label_keys = keys.repeat_interleave(num_label // num_kv, dim=1)
    labels = make_labels_reference(label_keys, rows, 4)
    if integer:
        labels = labels._replace(scale=torch.full_like(labels.scale, 0.5), offset=torch.full_like(labels.offset, -4.0))
    labels = Labels(*(t[:, :, :tokens] for t in labels))
    keys, values = keys[:, :, :tokens], values[:, :, :tokens]
    valid = torch.ones(batch, 1, tokens, dtype=torch.bool)
    if batch > 1:
        valid[-1, :, : tokens // 3] = False  # left padding
    lengths = valid.sum(-1)
    budgets = torch.minimum(torch.randint(1, max(2, tokens // 4), (batch, 1), generator=generator), lengths)
    return query, keys, values, rows, labels, valid, budgets


def separate(query, keys, values, rows, labels, valid, budgets, sink, recent, slots, num_select, scaling=0.125):
    """The three native kernels one after another, and their selection."""
    scores = label_scores_cpu(gather_query_channels(query, rows), labels, 4, scaling, num_select)
    indices, slot_valid = dispatch.select_tokens(scores, valid, budgets, sink, recent, slots, "cpu")
    out = dispatch.sparse_attention(query, keys, values, indices, slot_valid, scaling, "cpu")
    return out, indices


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, sink, recent", [(1, 0, 0), (37, 2, 3), (4100, 4, 16)])
def test_fused_step_equals_the_separate_kernels_bit_for_bit(layout, dtype, tokens, sink, recent):
    query, keys, values, rows, labels, valid, budgets = problem(layout, tokens, dtype, seed=tokens)
    slots = int(budgets.max()) + 2  # spare slots, invalid in every row
    num_select = layout[3]
    expected, expected_indices = separate(
        query, keys, values, rows, labels, valid, budgets, sink, recent, slots, num_select
    )
    out = torch.empty(query.shape[0], 1, query.shape[1], query.shape[3]).transpose(1, 2)
    workspace = torch.empty(
        native_ops.fused_decode_workspace_bytes(tokens, slots, query.shape[1] // num_select, torch.get_num_threads()),
        dtype=torch.uint8,
    )
    indices = torch.empty(expected_indices.shape, dtype=torch.int64)
    native_ops.fused_decode_into(
        query,
        rows,
        *labels,
        keys,
        values,
        valid,
        budgets,
        num_select,
        sink,
        recent,
        slots,
        0.125,
        out,
        workspace,
        indices,
    )
    assert torch.equal(indices, expected_indices)  # the same slots in the same order
    assert torch.equal(out.to(dtype), expected)
    actual = fused_decode_cpu(
        query, keys, values, rows, labels, 4, valid, budgets, sink, recent, slots, 0.125, num_select
    )
    assert actual.dtype == dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [5, 300, 4100])
def test_fused_step_matches_its_reference(layout, dtype, tokens):
    query, keys, values, rows, labels, valid, budgets = problem(layout, tokens, dtype, seed=7 + tokens, integer=True)
    slots, num_select = int(budgets.max()), layout[3]
    args = (query, keys, values, rows, labels, 4, valid, budgets, 1, 4, slots, 0.125, num_select)
    expected = fused_decode_reference(*args)
    actual = fused_decode_cpu(*args)
    assert actual.shape == expected.shape and actual.dtype == dtype
    tolerance = output_tolerance(dtype) if dtype != torch.float32 else 2e-6
    assert_close(actual, expected, tolerance)


def test_the_output_is_laid_out_for_the_attention_function():
    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[1], 300, torch.float32, seed=3)
    out = fused_decode_cpu(query, keys, values, rows, labels, 4, valid, budgets, 0, 1, 80, 0.125, 2)
    transposed = out.transpose(1, 2)
    assert transposed.is_contiguous() and transposed.contiguous().data_ptr() == transposed.data_ptr()


def test_dispatch_fuses_where_rows_fill_the_threads_and_gives_the_same_result_otherwise(monkeypatch):
    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[1], 500, torch.float32, seed=4)
    args = (query, keys, values, rows, labels, 4, valid, budgets, 1, 2, 130, 0.125, 2)
    calls = []
    real = dispatch.fused_decode_cpu
    monkeypatch.setattr(dispatch, "fused_decode_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dispatch, "_cpu_threads", lambda: 4)  # 2 batch rows x 2 selection heads: 4 rows
    fused = dispatch.fused_decode(*args, backend="cpu", scratch=Scratch())
    monkeypatch.setattr(dispatch, "_cpu_threads", lambda: 5)  # fewer rows than threads: the separate kernels
    split = dispatch.fused_decode(*args, backend="cpu", scratch=Scratch())
    assert calls == [1] and torch.equal(fused, split)
    torch_path = dispatch.fused_decode(*args, backend="torch")  # the references, op by op
    assert_close(torch_path, fused, 2e-6)


def test_labels_the_fused_kernel_does_not_take_run_the_separate_ops():
    query, keys, values, rows, _, valid, budgets = problem(LAYOUTS[1], 200, torch.float32, seed=5)
    labels8 = make_labels_reference(keys, rows, 8)
    assert not fused_decode_cpu_supports(query, keys, values, rows, labels8, 8, 2)
    out = dispatch.fused_decode(query, keys, values, rows, labels8, 8, valid, budgets, 0, 1, 60, 0.125, 2, "cpu")
    scores = dispatch.label_scores(gather_query_channels(query, rows), labels8, 8, 0.125, 2, "cpu")
    indices, slot_valid = dispatch.select_tokens(scores, valid, budgets, 0, 1, 60, "cpu")
    assert torch.equal(out, dispatch.sparse_attention(query, keys, values, indices, slot_valid, 0.125, "cpu"))
    with pytest.raises(ValueError, match="4-bit labels"):
        fused_decode_cpu(query, keys, values, rows, labels8, 8, valid, budgets, 0, 1, 60, 0.125, 2)


def test_channels_outside_the_head_are_refused_before_any_work():
    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[1], 100, torch.float32, seed=6)
    bad = rows.clone()
    bad[1, 3] = query.shape[-1]  # one past the head: it would read outside the query row
    with pytest.raises(ValueError, match=r"label channels must lie in \[0, 64\)"):
        fused_decode_cpu(query, keys, values, bad, labels, 4, valid, budgets, 0, 1, 30, 0.125, 2)


def test_the_fused_op_compiles_without_graph_breaks_and_equals_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[1], 300, torch.bfloat16, seed=8)

    def step(q, k, v, c, s, o):
        return fused_decode_cpu(q, k, v, rows, Labels(c, s, o), 4, valid, budgets, 1, 2, 80, 0.125, 2)

    args = (query, keys, values, *labels)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1 and "doublesparse.fused_decode" in counter.graphs[0].code
    assert torch.equal(compiled, step(*args))


def test_the_fused_op_passes_opcheck():
    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[1], 300, torch.float32, seed=9)
    torch.library.opcheck(
        torch.ops.doublesparse.fused_decode, (query, rows, *labels, keys, values, valid, budgets, 2, 1, 2, 80, 0.125)
    )


@pytest.fixture(scope="module")
def plain_build(tmp_path_factory):
    """The library without its shortcuts: byte tables for every r (no AVX-512 label scores), and a selection
    that ranks every candidate (no sampled floor under the threshold), loaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOUBLESPARSE_CACHE_DIR", str(tmp_path_factory.mktemp("plain")))
        flags = ["-DDOUBLESPARSE_NO_SIMD", "-DDOUBLESPARSE_SELECT_FULL_PASS"]
        library = native._build(native._compiler(), native.FLAG_SETS[0] + flags)
        lib, limits = native.open_library(library)
    return native.NativeBuild(lib, library, limits, [])


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 4100])
def test_both_label_score_paths_give_the_same_bits(plain_build, monkeypatch, tokens):
    _, keys, _, rows, labels, _, _ = problem(LAYOUTS[1], tokens, torch.float32, seed=10 + tokens)
    q_labels = torch.randn(2, 8, 1, 16, generator=torch.Generator().manual_seed(tokens))
    default = label_scores_cpu(q_labels, labels, 4, 0.125, 2).clone()
    monkeypatch.setattr(native, "native_build", lambda: plain_build)
    assert torch.equal(label_scores_cpu(q_labels, labels, 4, 0.125, 2), default)


def long_selection_problem(kind, seed):
    """Scores of 5000-token rows: heavy ties, or a sample that lies (every 16th token far above the rest)."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, tokens = 2, 3, 5000
    if kind == "ties":
        scores = torch.randint(-3, 4, (batch, heads, 1, tokens), generator=generator).float()
        scores[0, 0, 0, 7] = float("nan")  # above +inf, as in the reference
    else:  # the sampled floor lands above the threshold: too few candidates, so the full pass runs
        scores = torch.randn(batch, heads, 1, tokens, generator=generator)
        scores[..., ::16] += 100.0
    valid = torch.ones(batch, 1, tokens, dtype=torch.bool)
    valid[1, :, :600] = False  # left padding
    budgets = torch.tensor([[1200], [900]])
    return scores, valid, budgets


@pytest.mark.parametrize("kind", ["ties", "lying sample"])
@pytest.mark.parametrize("sink_tokens, recent_tokens", [(0, 0), (4, 16)])
def test_the_sampled_floor_selects_what_the_full_pass_selects_in_the_same_order(
    plain_build, monkeypatch, kind, sink_tokens, recent_tokens
):
    scores, valid, budgets = long_selection_problem(kind, seed=len(kind) + sink_tokens)
    slots = 1210
    indices, slot_valid = dispatch.select_tokens(scores, valid, budgets, sink_tokens, recent_tokens, slots, "cpu")
    indices = indices.clone()
    expected = select_tokens_reference(scores, valid, budgets, sink_tokens, recent_tokens, slots)
    keep = slot_valid.expand_as(indices)
    chosen = [sorted(row[k].tolist()) for row, k in zip(indices.view(-1, slots), keep.reshape(-1, slots))]
    reference = [sorted(row[k].tolist()) for row, k in zip(expected[0].view(-1, slots), keep.reshape(-1, slots))]
    assert chosen == reference
    monkeypatch.setattr(native, "native_build", lambda: plain_build)
    full, _ = dispatch.select_tokens(scores, valid, budgets, sink_tokens, recent_tokens, slots, "cpu")
    assert torch.equal(full, indices)  # the same slots in the same order: the attention sums alike


def test_the_fused_step_of_the_plain_build_gives_the_same_bits(plain_build, monkeypatch):
    query, keys, values, rows, labels, valid, budgets = problem(LAYOUTS[0], 4100, torch.float32, seed=11)
    args = (query, keys, values, rows, labels, 4, valid, budgets, 2, 8, int(budgets.max()), 0.125, 8)
    default = fused_decode_cpu(*args)
    monkeypatch.setattr(native, "native_build", lambda: plain_build)
    assert torch.equal(fused_decode_cpu(*args), default)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_decodes_through_the_fused_kernel_as_through_the_references(dtype, one_thread):
    # The CPU decode path end to end, in fp32 and in bf16 (what CPU users run): labels made from bf16 keys,
    # fp32 label queries, bf16 K/V read by the native attention, its fp32 output rounded to bf16.
    import doublesparse as ds
    from doublesparse.decode import StaticDecoder

    from tiny_models import left_padded_batch, random_channel_mask, tiny_model

    input_ids, attention_mask = left_padded_batch([40, 29], seed=12)
    results, calls = {}, []
    real = dispatch.fused_decode_cpu
    for backend in ("torch", "cpu"):
        model = tiny_model("llama", dtype=dtype)
        config = ds.SparsityConfig(
            num_channels=4, token_budget=0.25, label_bits=4, sink_tokens=1, recent_tokens=2, backend=backend
        )
        ds.apply(model, random_channel_mask(model), config)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dispatch, "fused_decode_cpu", lambda *a, backend=backend: calls.append(backend) or real(*a))
            results[backend] = StaticDecoder(model, max_cache_len=56).generate(input_ids, attention_mask, 8, True)
    assert calls and set(calls) == {"cpu"}  # the native path ran the fused kernel, the torch path never did
    assert torch.equal(results["cpu"].tokens, results["torch"].tokens)
    # fp32: the attention's summation order; bf16: two bf16 ulps of logits near 1 (measured: equal here).
    tolerance = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert (results["cpu"].logits.float() - results["torch"].logits.float()).abs().max() <= tolerance

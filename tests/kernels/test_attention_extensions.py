"""Sinks, softcapping and value widths in the attention ops: the default path unchanged, transformers' own
eager attentions matched, bad input refused, and the native CPU backend handing these calls to the reference."""

from types import SimpleNamespace

import frozen_attention as before
import pytest
import torch

from doublesparse.kernels import dispatch, native
from doublesparse.kernels.dense_attention import dense_attention_reference, dense_attention_triton
from doublesparse.kernels.host_gather import host_gather_reference, host_gather_triton
from doublesparse.kernels.sparse_attention import (
    _sparse_attention_per_query_head,
    masked_attention_reference,
    selection_mask,
    sparse_attention_cpu,
    sparse_attention_cpu_supports,
    sparse_attention_reference,
    sparse_attention_triton,
)

from kernel_cases import CASES, DEVICE, DTYPES, randn, random_problem

# ---------------------------------------------------------------------------------------------
# Called without the new arguments, every op returns exactly what it returned before them.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_sparse_ops_bit_identical_to_before(case, dtype):
    query, keys, values, indices, slot_valid = random_problem(case, dtype, seed=sum(case[:8]))
    args = (query, keys, values, indices, slot_valid, 0.1)
    assert torch.equal(sparse_attention_reference(*args), before.sparse_attention_reference(*args))
    assert torch.equal(_sparse_attention_per_query_head(*args), before._sparse_attention_per_query_head(*args))
    selected = selection_mask(indices, slot_valid, keys.shape[2])
    masked_args = (query, keys, values, selected, 0.1)
    assert torch.equal(masked_attention_reference(*masked_args), before.masked_attention_reference(*masked_args))
    for splits in {1, case[-1]}:
        now = sparse_attention_triton(*args, num_splits=splits)
        then = before.sparse_attention_triton(*args, num_splits=splits)
        assert torch.equal(now, then) and now.stride() == then.stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_dense_ops_bit_identical_to_before(ragged, dtype):
    generator = torch.Generator().manual_seed(11)
    # A query viewed from [B, L, H, d], as transformers hands it over: the output keeps that layout.
    query = randn(2, 1, 8, 64, dtype=dtype, generator=generator).transpose(1, 2)
    keys = randn(2, 2, 90, 64, dtype=dtype, generator=generator)
    values = randn(2, 2, 90, 64, dtype=dtype, generator=generator)
    valid = None
    if ragged:
        valid = (torch.arange(90)[None, None] >= torch.tensor([[[7]], [[90]]])).expand(2, 1, 90).to(DEVICE)
    assert torch.equal(
        dense_attention_reference(query, keys, values, 0.1, valid),
        before.dense_attention_reference(query, keys, values, 0.1, valid),
    )
    for splits in (1, 3):
        now = dense_attention_triton(query, keys, values, 0.1, valid, num_splits=splits)
        then = before.dense_attention_triton(query, keys, values, 0.1, valid, num_splits=splits)
        assert torch.equal(now, then) and now.stride() == then.stride()


# ---------------------------------------------------------------------------------------------
# transformers' own eager attentions (fp32, where they round as little as the ops do).


def every_token(batch, heads, rows, tokens, generator):
    """Indices covering every token, in a random order per row, all slots valid."""
    order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch * heads * rows)])
    slot_valid = torch.ones(batch, 1, rows, tokens, dtype=torch.bool, device=DEVICE)
    return order.view(batch, heads, rows, tokens).to(DEVICE), slot_valid


def ops_at_full_budget(query, keys, values, scaling, valid, **extras):
    """Every op's output [B, H_q, L, d_v] over every valid token: `valid` [B, L, T] (True for all: None)."""
    batch, q_heads, rows, _ = query.shape
    tokens = keys.shape[2]
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "dense reference": dense_attention_reference(query, keys, values, scaling, valid, **extras),
        "dense triton, 1 split": dense_attention_triton(query, keys, values, scaling, valid, num_splits=1, **extras),
        "dense triton, 3 splits": dense_attention_triton(query, keys, values, scaling, valid, num_splits=3, **extras),
    }
    for name, select_heads in (("group", keys.shape[1]), ("head", q_heads)):
        indices, slot_valid = every_token(batch, select_heads, rows, tokens, generator)
        if valid is not None:  # each slot valid where its token is
            slot_valid = torch.gather(valid[:, None].expand(-1, select_heads, -1, -1), 3, indices)
        args = (query, keys, values, indices, slot_valid, scaling)
        outputs[f"sparse reference, {name}"] = sparse_attention_reference(*args, **extras)
        if name == "group":  # (per-head selection in Triton: the oracle grid of test_kernels_sparse_attention.py)
            outputs[f"sparse triton, {name}, 2 splits"] = sparse_attention_triton(*args, num_splits=2, **extras)
        selected = selection_mask(indices, slot_valid, tokens)
        outputs[f"masked reference, {name}"] = masked_attention_reference(
            query, keys, values, selected, scaling, **extras
        )
    return outputs


def additive_mask(valid, dtype):
    """transformers' 4D additive mask [B, 1, L, T]: 0 where valid, the dtype's minimum elsewhere."""
    return torch.where(valid[:, None], 0.0, torch.finfo(dtype).min).to(dtype)


def left_padding(batch, rows, tokens):
    """valid [B, L, T]: batch row b starts at a different token; the last batch row sees none."""
    starts = torch.tensor([3 * b for b in range(batch - 1)] + [tokens]).view(batch, 1, 1)
    return (torch.arange(tokens)[None, None] >= starts).expand(batch, rows, tokens).to(DEVICE)


@pytest.mark.parametrize("padded, key_dim, value_dim", [(False, 64, 64), (True, 48, 32)])
def test_sinks_match_gpt_oss_eager_attention(padded, key_dim, value_dim):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    batch, q_heads, kv_heads, rows, tokens = 3, 4, 2, 2, 29
    generator = torch.Generator().manual_seed(1)
    query = randn(batch, q_heads, rows, key_dim, dtype=torch.float32, generator=generator)
    keys = randn(batch, kv_heads, tokens, key_dim, dtype=torch.float32, generator=generator)
    values = randn(batch, kv_heads, tokens, value_dim, dtype=torch.float32, generator=generator)
    sinks = (2 * torch.randn(q_heads, generator=generator)).to(DEVICE)
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=q_heads // kv_heads, training=False)
    valid = left_padding(batch, rows, tokens) if padded else None
    mask = None if valid is None else additive_mask(valid, torch.float32)
    expected, _ = eager_attention_forward(module, query, keys, values, mask, scaling=key_dim**-0.5, dropout=0.0)
    expected = expected.transpose(1, 2)
    if padded:  # every key masked and a finite sink: the eager attention returns zeros, and so must the ops
        assert (expected[-1] == 0).all()
    without_sinks = dense_attention_reference(query, keys, values, key_dim**-0.5, valid)
    assert (expected - without_sinks).abs().max() > 0.05, "the sinks must matter in this test"
    for name, actual in ops_at_full_budget(query, keys, values, key_dim**-0.5, valid, sinks=sinks).items():
        assert actual.shape == (batch, q_heads, rows, value_dim), name
        torch.testing.assert_close(
            actual, expected, atol=1e-5, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}"
        )


@pytest.mark.parametrize("padded", [False, True])
def test_softcap_matches_gemma2_eager_attention(padded):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    batch, q_heads, kv_heads, rows, tokens, head_dim, softcap = 3, 4, 2, 2, 31, 32, 5.0
    generator = torch.Generator().manual_seed(2)
    # Logits of a few times the cap, so the cap bites.
    query = 4 * randn(batch, q_heads, rows, head_dim, dtype=torch.float32, generator=generator)
    keys = randn(batch, kv_heads, tokens, head_dim, dtype=torch.float32, generator=generator)
    values = randn(batch, kv_heads, tokens, head_dim, dtype=torch.float32, generator=generator)
    module = SimpleNamespace(num_key_value_groups=q_heads // kv_heads, training=False, head_dim=head_dim)
    valid = left_padding(batch, rows, tokens) if padded else None
    mask = None if valid is None else additive_mask(valid, torch.float32)
    expected, _ = eager_attention_forward(
        module, query, keys, values, mask, dropout=0.0, scaling=head_dim**-0.5, softcap=softcap
    )
    expected = expected.transpose(1, 2)
    if padded:  # the eager attention averages every value of a row that sees nothing; the ops return zeros
        expected[-1] = 0
    uncapped = dense_attention_reference(query, keys, values, head_dim**-0.5, valid)
    assert (expected - uncapped).abs().max() > 0.05, "the cap must matter in this test"
    for name, actual in ops_at_full_budget(query, keys, values, head_dim**-0.5, valid, softcap=softcap).items():
        torch.testing.assert_close(
            actual, expected, atol=1e-5, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}"
        )


def test_value_width_matches_deepseek_v3_eager_attention():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import eager_attention_forward

    # A tiny DeepSeek-V3: keys of qk_nope_head_dim 32 + qk_rope_head_dim 16, values of v_head_dim 32.
    batch, q_heads, kv_heads, rows, tokens, key_dim, value_dim = 2, 4, 4, 1, 37, 48, 32
    generator = torch.Generator().manual_seed(3)
    query = randn(batch, q_heads, rows, key_dim, dtype=torch.float32, generator=generator)
    keys = randn(batch, kv_heads, tokens, key_dim, dtype=torch.float32, generator=generator)
    values = randn(batch, kv_heads, tokens, value_dim, dtype=torch.float32, generator=generator)
    module = SimpleNamespace(num_key_value_groups=1, training=False)
    expected, _ = eager_attention_forward(module, query, keys, values, None, scaling=key_dim**-0.5, dropout=0.0)
    for name, actual in ops_at_full_budget(query, keys, values, key_dim**-0.5, None).items():
        torch.testing.assert_close(
            actual, expected.transpose(1, 2), atol=1e-5, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}"
        )


# ---------------------------------------------------------------------------------------------
# Bad input is refused with a message that says what to change.


def small_problem(value_dim=16, value_heads=2, value_tokens=12):
    generator = torch.Generator().manual_seed(4)
    query = randn(1, 4, 1, 24, dtype=torch.float32, generator=generator)
    keys = randn(1, 2, 12, 24, dtype=torch.float32, generator=generator)
    values = randn(1, value_heads, value_tokens, value_dim, dtype=torch.float32, generator=generator)
    indices = torch.arange(12, device=DEVICE).expand(1, 2, 1, 12)
    return query, keys, values, indices, torch.ones(1, 1, 1, 12, dtype=torch.bool, device=DEVICE)


OPS = {
    "sparse reference": lambda q, k, v, i, s, **x: sparse_attention_reference(q, k, v, i, s, 0.2, **x),
    "sparse triton": lambda q, k, v, i, s, **x: sparse_attention_triton(q, k, v, i, s, 0.2, **x),
    "masked reference": lambda q, k, v, i, s, **x: masked_attention_reference(
        q, k, v, selection_mask(i, s, 12), 0.2, **x
    ),
    "dense reference": lambda q, k, v, i, s, **x: dense_attention_reference(q, k, v, 0.2, **x),
    "dense triton": lambda q, k, v, i, s, **x: dense_attention_triton(q, k, v, 0.2, **x),
    "dispatch sparse": lambda q, k, v, i, s, **x: dispatch.sparse_attention(q, k, v, i, s, 0.2, "torch", **x),
    "dispatch dense": lambda q, k, v, i, s, **x: dispatch.dense_attention(q, k, v, 0.2, None, "torch", **x),
}
BAD_EXTRAS = [
    (dict(sinks=torch.zeros(3)), r"sinks must be one float logit per query head, shape \[4\]"),
    (dict(sinks=torch.zeros(1, 4)), "sinks must be"),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), "sinks must be one float"),
    (dict(softcap=0.0), "softcap must be a positive"),
    (dict(softcap=-30.0), "softcap must be a positive"),
    (dict(softcap=float("inf")), "softcap must be a positive"),
    (dict(softcap=float("nan")), "softcap must be a positive"),
]


@pytest.mark.parametrize("extras, message", BAD_EXTRAS)
@pytest.mark.parametrize("op", OPS)
def test_bad_sinks_and_softcap_are_refused(op, extras, message):
    extras = {name: value.to(DEVICE) if torch.is_tensor(value) else value for name, value in extras.items()}
    with pytest.raises(ValueError, match=message):
        OPS[op](*small_problem(), **extras)


@pytest.mark.parametrize("values_shape", [dict(value_heads=1), dict(value_tokens=11)])
@pytest.mark.parametrize("op", OPS)
def test_values_that_do_not_fit_the_keys_are_refused(op, values_shape):
    with pytest.raises(ValueError, match="same batch, KV heads and tokens"):
        OPS[op](*small_problem(**values_shape))


@pytest.mark.parametrize("op", OPS)
def test_output_has_the_value_width(op):
    query, keys, values, indices, slot_valid = small_problem(value_dim=40)
    assert OPS[op](query, keys, values, indices, slot_valid).shape == (1, 4, 1, 40)


def test_triton_out_of_the_key_width_is_refused():
    query, keys, values, indices, slot_valid = small_problem(value_dim=16)
    with pytest.raises(ValueError, match=r"out must be torch.float32 of shape \(1, 4, 1, 16\)"):
        sparse_attention_triton(query, keys, values, indices, slot_valid, 0.2, out=torch.empty_like(query))


# ---------------------------------------------------------------------------------------------
# backend="cpu": the native kernel takes none of these, so the reference serves them, exactly.


@pytest.mark.skipif(not native.native_available(), reason="no C compiler here: " + native.native_error())
@pytest.mark.parametrize(
    "extras", [dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])), dict(softcap=1.5), dict(value_dim=16)]
)
def test_cpu_backend_routes_extras_to_the_reference(extras):
    extras = dict(extras)
    query, keys, values, indices, slot_valid = small_problem(value_dim=extras.pop("value_dim", 24))
    if DEVICE != "cpu":
        pytest.skip("the native kernels run on CPU tensors")
    plain_query, plain_keys, plain_values, *_ = small_problem(value_dim=24)
    assert sparse_attention_cpu_supports(plain_query, plain_keys, plain_values, indices), (
        "the plain problem must be native"
    )
    assert not sparse_attention_cpu_supports(query, keys, values, indices, **extras)
    expected = sparse_attention_reference(query, keys, values, indices, slot_valid, 0.2, **extras)
    assert torch.equal(
        dispatch.sparse_attention(query, keys, values, indices, slot_valid, 0.2, "cpu", **extras), expected
    )
    assert torch.equal(
        dispatch.dense_attention(query, keys, values, 0.2, None, "cpu", **extras),
        dense_attention_reference(query, keys, values, 0.2, **extras),
    )
    if not extras:  # the native wrapper itself refuses values of their own width instead of misreading them
        with pytest.raises(ValueError, match="backend='torch'"):
            sparse_attention_cpu(query, keys, values, indices, slot_valid, 0.2)


# ---------------------------------------------------------------------------------------------
# Offload: keys and values sit in stores of their own widths and are gathered with the same indices.


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_gather_keys_and_values_of_different_widths(dtype):
    generator = torch.Generator().manual_seed(5)
    # [capacity, B, H, d_k] and [capacity, B, H, d_v] in host memory (pinned where a GPU reads it)
    key_store = torch.randn(50, 2, 3, 48, generator=generator).to(dtype)
    value_store = torch.randn(50, 2, 3, 32, generator=generator).to(dtype)
    if torch.cuda.is_available():
        key_store, value_store = key_store.pin_memory(), value_store.pin_memory()
    indices = torch.randint(0, 50, (2, 3, 21), generator=generator).to(DEVICE)
    for store in (key_store, value_store):
        expected = store.permute(1, 2, 0, 3)[
            torch.arange(2)[:, None, None], torch.arange(3)[None, :, None], indices.cpu()
        ].to(DEVICE)
        width = store.shape[-1]
        assert torch.equal(
            host_gather_reference(store, indices, torch.empty(2, 3, 21, width, dtype=dtype, device=DEVICE)), expected
        )
        assert torch.equal(
            host_gather_triton(store, indices, torch.empty(2, 3, 21, width, dtype=dtype, device=DEVICE)), expected
        )
    wrong = torch.empty(2, 3, 21, 48, dtype=dtype, device=DEVICE)
    for gather in (host_gather_reference, host_gather_triton):
        with pytest.raises(ValueError, match=r"out \[B, H, N, 32\] \(the store's own row width\)"):
            gather(value_store, indices, wrong)


def test_sinks_of_any_float_dtype_and_layout():
    # A strided or half-precision parameter (a shard, a model in fp16) serves as well as a contiguous fp32 one.
    query, keys, values, indices, slot_valid = small_problem()
    dense_sinks = torch.tensor([1.5, -0.5, 0.25, 2.0], device=DEVICE)
    strided = torch.stack([dense_sinks, torch.zeros_like(dense_sinks)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    for op in OPS.values():
        expected = op(query, keys, values, indices, slot_valid, sinks=dense_sinks)
        torch.testing.assert_close(op(query, keys, values, indices, slot_valid, sinks=strided), expected)
        torch.testing.assert_close(op(query, keys, values, indices, slot_valid, sinks=dense_sinks.half()), expected)

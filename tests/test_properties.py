"""Property-based tests: every case ends in a right result or a ValueError, never another exception.

Three families, drawn by hypothesis (derandomized, bounded, so the file is deterministic and quick):
- `SparsityConfig` values of every type: a ValueError, or a config whose knobs are what they claim,
  whose budgets obey their rules and which survives a round trip through JSON;
- channel-mask files, corrupted (truncated, bytes flipped, header and metadata rewritten, tensors
  reshaped, recast or poisoned) and authors' JSON of any shape: a ValueError naming the file, or a
  mask whose parts agree;
- kernel shapes (lengths, budgets, GQA groups, selection heads, left padding, fp32/fp16, label bits,
  torch and native backends): labels, scores, selection and sparse attention checked against plain
  references written here, loop by loop.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from doublesparse.channels import ChannelMask
from doublesparse.config import SparsityConfig
from doublesparse.kernels.dispatch import label_scores, make_labels, select_tokens, sparse_attention
from doublesparse.kernels.label_append import dequantize_labels
from doublesparse.kernels.label_scores import gather_query_channels
from doublesparse.kernels.native import native_available
from doublesparse.kernels.sparse_attention import masked_attention_reference, selection_mask
from doublesparse.layout import HeadLayout
from doublesparse.policy import row_budgets

pytest.importorskip("hypothesis", reason="the property tests need hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402  (after the skip above)
from hypothesis import strategies as st  # noqa: E402


def bounded(examples: int) -> settings:
    """Deterministic (derandomized, no example database), no deadline, at most `examples` cases."""
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ------------------------------------------------------------------------------------ SparsityConfig

ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(-1, 5), max_size=3),
    st.lists(st.one_of(st.integers(0, 3), st.floats(0, 3), st.text(max_size=1)), max_size=3),
)
GOOD = {
    "num_channels": st.sampled_from([2, 4, 8, 16]),
    "token_budget": st.one_of(st.integers(1, 200), st.floats(0.01, 1.0)),
    "label_bits": st.sampled_from([16, 8, 4]),
    "sink_tokens": st.integers(0, 8),
    "recent_tokens": st.integers(0, 8),
    "dense_layers": st.one_of(st.lists(st.integers(0, 6), max_size=3), st.sets(st.integers(0, 6)), st.just(range(2))),
    "min_seq_len": st.integers(0, 50),
    "selection": st.sampled_from(["group", "head"]),
    "backend": st.sampled_from(["auto", "torch"]),
    "simulate": st.booleans(),
    "offload": st.booleans(),
    "prefetch": st.booleans(),
    "sync_layers": st.one_of(st.none(), st.lists(st.integers(0, 6), max_size=3)),
    "prefetch_min_recall": st.floats(0, 1),
    "prefetch_warmup_steps": st.integers(0, 8),
    "host_memory_limit": st.one_of(st.none(), st.integers(1, 1 << 40)),
}
BAD = {
    "num_channels": st.one_of(st.integers(-2, 0), st.sampled_from([4.0, 16.0, True])),
    "token_budget": st.one_of(st.integers(-1, 0), st.floats(-0.5, 0.0), st.floats(1.01, 100), st.sampled_from([64.0])),
    "label_bits": st.sampled_from([4.0, 8.0, 16.0, 2, 32, True, "4"]),
    "sink_tokens": st.one_of(st.integers(-3, -1), st.sampled_from([1.0, True])),
    "recent_tokens": st.one_of(st.integers(-3, -1), st.sampled_from([2.0, False])),
    "dense_layers": st.one_of(st.just([0, -1]), st.just([1, "a"]), st.just([True]), st.just([1.0]), st.just(3)),
    "selection": st.sampled_from(["token", "", "GROUP"]),
    "backend": st.sampled_from(["cuda", "", "numpy"]),
    "simulate": st.sampled_from([1, 0, "yes"]),
    "sync_layers": st.one_of(st.just([-1]), st.just([0.5]), st.just("0")),
    "prefetch_min_recall": st.one_of(st.floats(1.01, 5), st.floats(-5, -0.01), st.just(float("nan"))),
    "host_memory_limit": st.one_of(st.integers(-5, 0), st.just(1e9), st.just(True)),
}
FIELDS = sorted(GOOD)


@st.composite
def config_values(draw):
    """Keyword arguments of SparsityConfig: some fields set to good values, a few to bad or arbitrary ones."""
    values = draw(st.fixed_dictionaries({}, optional=GOOD))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        values[name] = draw(st.one_of(BAD.get(name, ANYTHING), ANYTHING))
    return values


def check_valid_config(config: SparsityConfig) -> None:
    for name in ("num_channels", "label_bits", "sink_tokens", "recent_tokens", "min_seq_len", "prefetch_warmup_steps"):
        assert type(getattr(config, name)) is int, name
    assert config.label_bits in (16, 8, 4) and config.num_channels >= 1
    assert config.selection in ("group", "head") and config.backend in ("auto", "torch", "triton", "cpu")
    assert all(type(getattr(config, name)) is bool for name in ("simulate", "offload", "prefetch"))
    assert list(config.dense_layers) == sorted(config.dense_layers) and all(type(i) is int for i in config.dense_layers)
    budget = config.token_budget
    assert (type(budget) is int and budget >= 1) or (type(budget) is float and 0 < budget <= 1)
    lengths = [0, 1, 2, 3, 7, 64, 1000]
    for length in lengths:
        attended = config.budget_for(length)
        if length == 0:
            assert attended == 0
            continue
        assert 1 <= attended <= length
        if length < config.min_seq_len:
            assert attended == length
        elif type(budget) is int:
            assert attended == min(length, budget)
        else:
            assert attended == max(1, min(length, math.ceil(budget * length - 1e-9)))
    vectorised = row_budgets(config, torch.tensor(lengths))
    assert vectorised.tolist() == [config.budget_for(n) for n in lengths]
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert SparsityConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@bounded(300)
@given(config_values())
def test_sparsity_config_is_valid_or_refused(values):
    try:
        config = SparsityConfig(**values)
    except ValueError as error:
        assert str(error).startswith("SparsityConfig.")
        event("refused")
        return
    event("valid")
    check_valid_config(config)
    for layers, head_dim in ((1, 8), (8, 128)):
        try:
            config.check_model(layers, head_dim)
        except ValueError as error:
            assert "SparsityConfig." in str(error)


@bounded(150)
@given(
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4)), ANYTHING, max_size=4),
    st.dictionaries(st.sampled_from(FIELDS), ANYTHING, max_size=3),
)
def test_sparsity_config_from_dict_and_replace_are_valid_or_refused(data, changes):
    for build in (
        lambda: SparsityConfig.from_dict(data),
        lambda: SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0).replace(**changes),
    ):
        try:
            config = build()
        except ValueError:
            continue
        check_valid_config(config)


# ------------------------------------------------------------------------------------- mask files


@st.composite
def masks(draw):
    """A valid small ChannelMask, with or without statistics, per query head or per KV head."""
    num_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    layers = draw(st.integers(1, 2))
    layout = HeadLayout(layers, num_kv * group, num_kv, head_dim, "llama", draw(st.sampled_from(["", "m"])))
    per_kv = draw(st.booleans())
    rows = num_kv if per_kv else num_kv * group
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    statistics = {}
    if draw(st.booleans()):
        statistics = {kind: torch.rand(layers, rows, head_dim, generator=generator) for kind in ("q", "k", "qk")}
        ranking = statistics["qk"].argsort(dim=-1, descending=True, stable=True)
    else:
        ranking = torch.rand(layers, rows, head_dim, generator=generator).argsort(dim=-1)
    return ChannelMask(ranking, "qk", layout, per_kv, statistics, {"seed": seed})


def loaded_or_refused(path, **kwargs):
    """The mask at `path`, checked to be coherent, or None where loading raised a ValueError naming the file."""
    try:
        mask = ChannelMask.load(path, **kwargs)
    except ValueError as error:
        assert str(path) in str(error), f"the message does not name the file: {error}"
        event("refused")
        return None
    event("loaded")
    assert_coherent(mask)
    assert_coherent(mask.per_kv())
    assert mask.top(1).shape[-1] == 1
    for kind in mask.statistics:
        assert_coherent(mask.with_kind(kind))
    return mask


def assert_coherent(mask: ChannelMask) -> None:
    """Checked here, independently of ChannelMask's own checks: the parts of a mask agree."""
    layout, ranking = mask.layout, mask.ranking
    rows = layout.num_kv_heads if mask.per_kv_head else layout.num_heads
    assert ranking.dtype == torch.int64 and tuple(ranking.shape) == (layout.num_layers, rows, layout.head_dim)
    assert layout.num_heads % layout.num_kv_heads == 0
    assert torch.equal(ranking.sort(dim=-1).values, torch.arange(layout.head_dim).expand_as(ranking))
    for kind, stat in mask.statistics.items():
        assert kind in ("q", "k", "qk") and stat.dtype.is_floating_point and stat.shape == ranking.shape
        assert bool(torch.isfinite(stat).all()) and bool((stat >= 0).all())
    if mask.kind in mask.statistics and not mask.calibration.get("rope_pair_dim"):
        ordered = mask.statistics[mask.kind].gather(-1, ranking)
        assert bool((ordered[..., 1:] <= ordered[..., :-1]).all())


BYTE_EDITS = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)  # (where, new byte)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
    st.tuples(
        st.just("flip header"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=3)
    ),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("random"), st.binary(max_size=96)),
)


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("masks")


@bounded(150)
@given(masks(), CORRUPTIONS)
def test_corrupted_mask_bytes_load_coherently_or_are_refused(mask_folder, mask, corruption):
    path = mask_folder / "mask.safetensors"
    mask.save(path)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    how, detail = corruption
    if how == "truncate":
        data = data[: int(detail * (len(data) - 1))]
    elif how in ("flip", "flip header"):
        end = header_end if how == "flip header" else len(data)
        for where, value in detail:
            data[min(int(where * end), end - 1)] = value
    elif how == "append":
        data += detail
    else:
        data = bytearray(detail)
    path.write_bytes(bytes(data))
    loaded = loaded_or_refused(path)
    if loaded is not None and how == "append":
        assert torch.equal(loaded.ranking, mask.ranking)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=4)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


@bounded(150)
@given(
    masks(),
    st.sampled_from(["kind", "per_kv_head", "layout", "calibration", "format", "format_version"]),
    st.one_of(JSON_VALUES.map(json.dumps), st.text(max_size=12)),
)
def test_rewritten_mask_metadata_loads_coherently_or_is_refused(mask_folder, mask, key, text):
    path = mask_folder / "mask.safetensors"
    mask.save(path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"][key] = text
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size :])
    loaded_or_refused(path)


def poisoned(stat: torch.Tensor, change: str) -> torch.Tensor:
    """Statistics changed as `change` says (another shape, NaN, negative, integer), or kept."""
    if change == "stat shape":
        return stat[..., :1].contiguous()
    if change == "stat nan":
        return stat.clone().fill_(float("nan"))
    if change == "stat negative":
        return -stat
    if change == "stat int":
        return (stat * 10).to(torch.int32)
    return stat


RECASTS = {"float": torch.float32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
TENSOR_CHANGES = st.sampled_from(
    ["flatten", "transpose", "drop layer", "add head", "float", "int8", "uint8", "bool", "shift", "duplicate",
     "stat shape", "stat nan", "stat negative", "stat int", "stat drop", "unknown tensor", "no ranking", "swap"]
)  # fmt: skip


@bounded(150)
@given(masks(), st.lists(TENSOR_CHANGES, min_size=1, max_size=2), st.sampled_from([None, "q", "k", "qk"]))
def test_reshaped_and_recast_mask_tensors_load_coherently_or_are_refused(mask_folder, mask, changes, kind):
    ranking = mask.ranking.to(torch.int32)
    statistics = dict(mask.statistics)
    for change in changes:
        if change == "flatten":
            ranking = ranking.reshape(-1)
        elif change == "transpose" and ranking.dim() == 3:
            ranking = ranking.transpose(0, 2).contiguous()
        elif change == "drop layer" and ranking.dim() == 3:
            ranking = ranking[:-1].contiguous()
        elif change == "add head" and ranking.dim() == 3:
            ranking = torch.cat([ranking, ranking[:, :1]], dim=1)
        elif change in ("float", "int8", "uint8", "bool"):
            ranking = ranking.to(
                {"float": torch.float32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}[change]
            )
        elif change == "shift":
            ranking = ranking + 1
        elif change == "duplicate" and ranking.dim() == 3 and ranking.shape[2] > 1:
            ranking = ranking.clone()
            ranking[..., 1] = ranking[..., 0]
        elif change == "swap" and ranking.dim() == 3 and ranking.shape[2] > 1:
            ranking = ranking[..., [1, 0, *range(2, ranking.shape[2])]].contiguous()
        elif change.startswith("stat") and statistics:
            name = sorted(statistics)[len(changes) % len(statistics)]
            stat = statistics[name]
            statistics[name] = poisoned(stat, change)
            if change == "stat drop":
                del statistics[name]
    tensors = {f"statistics.{k}": v.contiguous() for k, v in statistics.items()}
    if "no ranking" not in changes:
        tensors["ranking"] = ranking.contiguous()
    if "unknown tensor" in changes:
        tensors["extra"] = torch.zeros(1)
    if not tensors:
        tensors["statistics.qk"] = torch.zeros(1)
    metadata = {
        "format": "doublesparse.channel_mask",
        "format_version": "1",
        "kind": "qk",
        "per_kv_head": json.dumps(mask.per_kv_head),
        "layout": json.dumps(mask.layout.to_dict()),
        "calibration": json.dumps(mask.calibration),
    }
    path = mask_folder / "mask.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    loaded_or_refused(path, kind=kind)


def authors_key(layer, kind):
    return f"model.layers.{layer}.self_attn.{kind}_proj"


@st.composite
def authors_documents(draw):
    """Authors' JSON documents: mostly well-formed, with parts replaced by anything JSON can hold."""
    layers, rows, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    document = {}
    for kind in draw(st.lists(st.sampled_from(["q", "k", "qk"]), min_size=1, max_size=3, unique=True)):
        for layer in range(layers):
            table = [draw(st.permutations(range(head_dim))) for _ in range(rows if kind != "k" else 1)]
            document[authors_key(layer, kind)] = table
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(sorted(document)), st.text(max_size=8),
                             st.builds(authors_key, st.one_of(st.integers(0, 3), st.text(max_size=2)),
                                       st.sampled_from(["q", "k", "qk", "v"]))))  # fmt: skip
        document[key] = draw(JSON_VALUES)
    return draw(st.one_of(st.just(document), JSON_VALUES)) if draw(st.integers(0, 9)) == 0 else document


@bounded(200)
@given(authors_documents(), st.sampled_from([None, "q", "k", "qk"]), st.booleans())
def test_authors_json_of_any_shape_loads_coherently_or_is_refused(mask_folder, document, kind, with_layout):
    path = mask_folder / "authors.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    layout = HeadLayout(num_layers=2, num_heads=3, num_kv_heads=1, head_dim=4) if with_layout else None
    mask = loaded_or_refused(path, kind=kind, layout=layout)
    if mask is not None and not with_layout:
        try:
            mask.for_model(HeadLayout(num_layers=mask.num_layers, num_heads=2, num_kv_heads=1, head_dim=mask.head_dim))
        except ValueError as error:
            assert "calibrate this model" in str(error)


@bounded(60)
@given(st.binary(max_size=64), st.sampled_from(["authors.json", "mask.safetensors"]))
def test_random_bytes_are_refused(mask_folder, data, name):
    path = mask_folder / name
    path.write_bytes(data)
    assert loaded_or_refused(path) is None


# ------------------------------------------------------------------------------------ kernel shapes

BACKENDS = ["torch"] + (["cpu"] if native_available() else [])


@st.composite
def decode_problems(draw):
    batch = draw(st.integers(1, 2))
    num_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    selection = draw(st.sampled_from(["group", "head"]))
    head_dim = draw(st.sampled_from([8, 16]))
    bits = draw(st.sampled_from([16, 8, 4]))
    num_channels = draw(st.sampled_from([2, 4, head_dim]))
    length = draw(st.integers(1, 40))
    rows = draw(st.integers(1, min(3, length)))
    padding = [draw(st.integers(0, length - rows)) for _ in range(batch)]
    budget = draw(st.one_of(st.integers(1, 48), st.floats(0.01, 1.0)))
    sink, recent = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    backend = draw(st.sampled_from(BACKENDS))
    seed = draw(st.integers(0, 2**16))
    return (
        batch,
        num_kv,
        group,
        selection,
        head_dim,
        bits,
        num_channels,
        length,
        rows,
        padding,
        budget,
        sink,
        recent,
        dtype,
        backend,
        seed,
    )  # noqa: E501


def plain_forced(positions, budget, sink, recent):
    recent_kept = min(budget, max(recent, 1))
    sink_kept = min(max(budget - recent_kept, 0), sink)
    return set(positions[len(positions) - recent_kept :]) | set(positions[:sink_kept])


@bounded(120)
@given(decode_problems())
def test_decode_kernels_match_plain_references(problem):
    (batch, num_kv, group, selection, head_dim, bits, num_channels, length, rows, padding, budget, sink, recent,
     dtype, backend, seed) = problem  # fmt: skip
    try:
        config = SparsityConfig(num_channels=num_channels, token_budget=budget, label_bits=bits, sink_tokens=sink,
                                recent_tokens=recent, selection=selection, backend=backend)  # fmt: skip
    except ValueError:
        event("config refused")
        return  # e.g. sinks and recent tokens that do not fit an int budget: refused, as they must be
    event(f"checked {backend} {bits}-bit")
    generator = torch.Generator().manual_seed(seed)
    num_q = num_kv * group
    num_select = num_kv if selection == "group" else num_q
    query = torch.randn(batch, num_q, rows, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, num_kv, length, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, num_kv, length, head_dim, generator=generator).to(dtype)
    channels = torch.stack([torch.randperm(head_dim, generator=generator)[:num_channels] for _ in range(num_select)])
    positions = torch.arange(length)
    causal = positions[None, :] <= (length - rows + torch.arange(rows))[:, None]
    valid = torch.stack([causal & (positions >= pad)[None, :] for pad in padding])
    budgets = row_budgets(config, valid.sum(-1))
    scaling = head_dim**-0.5

    # Labels: the chosen channels of each key, within half a quantization step.
    labels = make_labels(keys, channels, bits, backend)
    dequantized = dequantize_labels(labels, bits).double()
    per_select = num_select // num_kv
    exact = torch.stack([keys[:, h // per_select][..., channels[h]] for h in range(num_select)], dim=1).double()
    step = 0 if bits == 16 else labels.scale.double()[..., None] / 2
    half_ulp = 2e-3 * exact.abs() + 1e-6  # fp16 storage of 16-bit labels, and of scale and offset
    assert bool(((dequantized - exact).abs() <= step + half_ulp + 1e-3 * (bits != 16)).all())

    # Scores: each query head against the labels it reads, max over the heads of a selection.
    scores = label_scores(gather_query_channels(query, channels), labels, bits, scaling, num_select, backend)
    assert scores.shape == (batch, num_select, rows, length) and scores.dtype == torch.float32
    per_head = group * num_kv // num_select
    plain = torch.empty(batch, num_select, rows, length, dtype=torch.float64)
    for h in range(num_select):
        heads = range(h * per_head, (h + 1) * per_head)
        dots = [query[:, q][..., channels[h]].double() @ dequantized[:, h].transpose(-1, -2) for q in heads]
        plain[:, h] = torch.stack(dots).amax(0) * scaling
    assert torch.allclose(scores.double(), plain, rtol=1e-4, atol=1e-4)

    # Selection: the budget's count of distinct valid tokens, the forced ones included, the rest by score.
    max_budget = int(budgets.max())
    indices, slot_valid = select_tokens(scores, valid, budgets, sink, recent, max_budget, backend)
    assert indices.shape == (batch, num_select, rows, max_budget) and slot_valid.shape == (batch, 1, rows, max_budget)
    for b in range(batch):
        for i in range(rows):
            allowed = valid[b, i].nonzero().flatten().tolist()
            count = int(budgets[b, i])
            assert slot_valid[b, 0, i].tolist() == [slot < count for slot in range(max_budget)]
            forced = plain_forced(allowed, count, sink, recent)
            for h in range(num_select):
                chosen = indices[b, h, i, :count].tolist()
                assert len(set(chosen)) == count and set(chosen) <= set(allowed) and forced <= set(chosen)
                row = scores[b, h, i]
                others = [n for n in allowed if n not in chosen]
                for c in set(chosen) - forced:
                    for n in others:
                        assert row[c] > row[n] or (row[c] == row[n] and (c > n or row[c] == 0))

    # Attention: exact softmax attention over each row's chosen tokens.
    out = sparse_attention(query, keys, values, indices, slot_valid, scaling, backend)
    masked = masked_attention_reference(query, keys, values, selection_mask(indices, slot_valid, length), scaling)
    expected = torch.empty(batch, num_q, rows, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(num_q):
            kv, s = q // group, q // (num_q // num_select)
            for i in range(rows):
                chosen = indices[b, s, i, : int(budgets[b, i])]
                logits = query[b, q, i].double() @ keys[b, kv, chosen].double().T * scaling
                expected[b, q, i] = logits.softmax(-1) @ values[b, kv, chosen].double()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    for result in (out, masked):
        assert result.shape == query.shape and result.dtype == dtype
        assert torch.allclose(result.double(), expected, rtol=tolerance, atol=tolerance)


@bounded(60)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 6), st.sampled_from([16, 8, 4]), st.sampled_from(BACKENDS))
def test_label_scores_of_mismatched_heads_are_refused(num_q, num_label, num_select, bits, backend):
    generator = torch.Generator().manual_seed(num_q * 100 + num_label * 10 + num_select)
    keys = torch.randn(1, num_label, 5, 8, generator=generator)
    channels = torch.arange(4).expand(num_label, 4).contiguous()
    labels = make_labels(keys, channels, bits, backend)
    q_labels = torch.randn(1, num_q, 1, 4, generator=generator)
    try:
        scores = label_scores(q_labels, labels, bits, 0.5, num_select, backend)
    except ValueError:
        assert num_q % num_label or num_q % num_select
        return
    assert not (num_q % num_label or num_q % num_select)
    assert scores.shape == (1, num_select, 1, 5) and bool(torch.isfinite(scores).all())

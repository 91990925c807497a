"""The native library's build, cache and load are safe: keyed by what the machine code depends on, verified
before loading, never fatal to the process, and its kernels are torch ops that compile without graph breaks.

Loads of corrupted files run in a child process, so a crash (SIGBUS, SIGILL) fails a test instead of
killing pytest. Every build goes to a temporary cache, never the user's.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import doublesparse as ds
from doublesparse.decode import StaticDecoder
from doublesparse.kernels import dispatch, native
from doublesparse.kernels.label_append import Labels, make_labels_reference
from doublesparse.kernels.label_scores import label_scores_cpu, label_scores_reference
from doublesparse.kernels.selection import select_tokens_cpu, select_tokens_reference
from doublesparse.kernels.sparse_attention import (
    sparse_attention_cpu,
    sparse_attention_cpu_supports,
    sparse_attention_reference,
)

from tiny_models import left_padded_batch, random_channel_mask, tiny_model

pytestmark = pytest.mark.skipif(not native.native_available(), reason="no C compiler here: " + native.native_error())

FLAGS = native.FLAG_SETS[0]

# Loads native.py on its own (it needs only torch) with DOUBLESPARSE_CACHE_DIR from the environment,
# optionally with rebuilds made to fail, and reports what loading found and logged.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, logging, sys
    spec = importlib.util.spec_from_file_location("native_under_test", sys.argv[1])
    native = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("native_under_test").addHandler(handler)
    runtimes_before = sorted(native._mapped_openmp_runtimes())
    if sys.argv[2] == "no-rebuild":
        def refuse(*args):
            raise native.BuildError("rebuilding is disabled by the test")
        native._compile = refuse
    build = native.native_build()
    available = [native.native_available() for _ in range(3)]
    try:
        native.require_native()
        error = ""
    except ValueError as raised:
        error = str(raised)
    print(json.dumps({"loaded": build.library is not None, "path": str(build.path), "problems": build.problems,
                      "available": available, "error": error, "messages": messages,
                      "runtimes_before": runtimes_before, "runtimes_after": sorted(native._mapped_openmp_runtimes())}))
    """
)


def run_child(cache: pathlib.Path, mode: str = "normal") -> dict:
    """Load the library in a child process with `cache` as the cache dir; fail the test if the child crashed."""
    env = {**os.environ, "DOUBLESPARSE_CACHE_DIR": str(cache)}
    command = [sys.executable, "-c", CHILD, native.__file__, mode]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, f"the loading process died (status {child.returncode}):\n{child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir for this test; returns its native/ folder."""
    monkeypatch.setenv("DOUBLESPARSE_CACHE_DIR", str(tmp_path))
    return tmp_path / "native"


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """One verified build (library and record) that tests copy into their own cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOUBLESPARSE_CACHE_DIR", str(tmp_path_factory.mktemp("built")))
        return native._build(native._compiler(), FLAGS)


def copy_build(library: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(library.with_suffix(".json"), folder)
    return pathlib.Path(shutil.copy2(library, folder))


# --- the build key ----------------------------------------------------------------------------------


def test_build_key_changes_when_the_cpu_flags_change(monkeypatch):
    compiler = native._compiler()
    inputs = native.build_inputs(compiler, FLAGS)
    key = native.build_key(inputs)
    assert native.build_key(native.build_inputs(compiler, FLAGS)) == key  # stable
    assert inputs["compiler_version"] and inputs["native_target"] and inputs["flags"] == FLAGS
    monkeypatch.setattr(native, "cpu_features", lambda: sorted(inputs["cpu_features"] + ["an_imagined_isa"]))
    assert native.build_key(native.build_inputs(compiler, FLAGS)) != key
    monkeypatch.undo()
    monkeypatch.setattr(native, "compiler_target", lambda compiler: inputs["native_target"] + ["-mimagined"])
    assert native.build_key(native.build_inputs(compiler, FLAGS)) != key
    monkeypatch.undo()
    assert native.build_key(native.build_inputs(compiler, FLAGS + ["-DDOUBLESPARSE_NO_F16C"])) != key


def test_cpu_features_are_the_sorted_cpuinfo_flags():
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    line = next((line for line in lines if line.startswith(("flags", "Features"))), None)
    if line is None:
        pytest.skip("/proc/cpuinfo lists no CPU flags here")
    assert native.cpu_features() == sorted(set(line.split(":", 1)[1].split()))


def test_compiler_target_resolves_march_native():
    target = native.compiler_target(native._compiler())
    assert target and not target[0].startswith(("unknown", "unsupported"))
    assert set(target) - {"-march=native"}  # what the driver resolved it to, not only the flag as given


def test_a_library_built_for_other_cpu_flags_is_not_loaded(cache, monkeypatch):
    compiler = native._compiler()
    ours = native._build(compiler, FLAGS)
    stamp = ours.stat().st_mtime_ns
    other_features = native.cpu_features() + ["an_imagined_isa"]
    monkeypatch.setattr(native, "cpu_features", lambda: other_features)
    other_inputs = native.build_inputs(compiler, FLAGS)
    theirs = native._build(compiler, FLAGS)
    assert theirs != ours and ours.stat().st_mtime_ns == stamp  # built anew under another name
    # Our library and record planted under the other machine's name are refused by their record and rebuilt.
    shutil.copy2(ours, theirs)
    shutil.copy2(ours.with_suffix(".json"), theirs.with_suffix(".json"))
    assert "other build inputs" in native.verify_cached(theirs, other_inputs)
    assert native._build(compiler, FLAGS) == theirs and native.verify_cached(theirs, other_inputs) is None
    assert json.loads(theirs.with_suffix(".json").read_text())["inputs"]["cpu_features"] == other_features


def test_concurrent_first_uses_build_once(cache, monkeypatch):
    compiles = []
    real_compile = native._compile
    monkeypatch.setattr(native, "_compile", lambda *args: compiles.append(args) or real_compile(*args))
    results = []
    threads = [threading.Thread(target=lambda: results.append(native._build(native._compiler(), FLAGS))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compiles) == 1 and len(results) == 2 and results[0] == results[1]
    expected_files = [results[0].with_suffix(suffix).name for suffix in (".json", ".lock", ".so")]
    assert sorted(path.name for path in cache.iterdir()) == expected_files


# --- verification before loading ------------------------------------------------------------------


def truncate(library: pathlib.Path) -> None:
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def garble(library: pathlib.Path) -> None:
    data = bytearray(library.read_bytes())
    third = len(data) // 3
    data[third : 2 * third] = b"\x06" * third  # not an instruction in 64-bit mode: SIGILL where executed
    library.write_bytes(bytes(data))


def replace_with_foreign(library: pathlib.Path) -> None:
    source = library.with_name("foreign.c")
    source.write_text("int answer(void) { return 42; }\n")
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    source.unlink()


def replace_with_foreign_and_record_it(library: pathlib.Path) -> None:
    replace_with_foreign(library)
    record_path = library.with_suffix(".json")
    record = json.loads(record_path.read_text())
    record.update(sha256=native._sha256(library), size=library.stat().st_size)
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (truncate, "discarding"),
        (garble, "SHA-256 differs"),
        (replace_with_foreign, "discarding"),
        (replace_with_foreign_and_record_it, "is not doublesparse's library"),
    ],
)
def test_a_corrupted_cached_library_is_rebuilt_without_crashing(built_library, tmp_path, corrupt, problem):
    library = copy_build(built_library, tmp_path / "native")
    corrupt(library)
    found = run_child(tmp_path)
    assert found["loaded"] and found["available"] == [True] * 3 and found["error"] == ""
    assert pathlib.Path(found["path"]).name == library.name  # the same build, rebuilt in place
    assert found["runtimes_after"] == found["runtimes_before"]  # the library brought no OpenMP runtime of its own
    assert problem in "\n".join(found["messages"] + found["problems"])
    assert native.verify_cached(library, json.loads(library.with_suffix(".json").read_text())["inputs"]) is None


def test_a_corrupted_library_that_cannot_be_rebuilt_falls_back_with_one_warning(built_library, tmp_path):
    garble(copy_build(built_library, tmp_path / "native"))
    found = run_child(tmp_path, "no-rebuild")
    assert not found["loaded"] and found["available"] == [False] * 3
    assert "rebuilding is disabled by the test" in found["error"] and "backend='torch'" in found["error"]
    fallbacks = [message for message in found["messages"] if "unavailable" in message]
    assert len(fallbacks) == 1 and "rebuilding is disabled by the test" in fallbacks[0]


def test_auto_fallback_logs_once_naming_the_reason(cache, tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'this compiler is broken on purpose' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    # A fresh process-wide result for this test only (the real one is restored afterwards).
    monkeypatch.setattr(native, "_LOADED", [])
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert [dispatch.resolve_backend("auto", torch.device("cpu")) for _ in range(3)] == ["torch"] * 3
        with pytest.raises(ValueError, match="broken on purpose"):
            dispatch.resolve_backend("cpu", torch.device("cpu"))
    ours = [record.getMessage() for record in caplog.records if record.name == native.__name__]
    fallbacks = [message for message in ours if "backend='auto' runs the torch" in message]
    assert len(fallbacks) == 1 and "broken on purpose" in fallbacks[0]


def test_the_library_reports_its_key_and_links_the_openmp_runtime_torch_loaded():
    build = native.native_build()
    assert build.library.doublesparse_build_key().decode() == build.path.stem.split("-", 1)[1]
    record = json.loads(build.path.with_suffix(".json").read_text())
    runtime = native.openmp_runtime()
    if runtime is not None:  # where torch has an OpenMP runtime, the kernels share it
        assert record["inputs"]["openmp_runtime"] == runtime and runtime in record["inputs"]["link"]
        assert build.limits.openmp > 0


def test_without_an_openmp_runtime_to_share_the_library_is_built_single_threaded(cache, monkeypatch, caplog):
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)  # as with a torch built without OpenMP
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        build = native.load_native()
    assert build.library is not None and build.limits.openmp == 0
    record = json.loads(build.path.with_suffix(".json").read_text())
    assert "-fopenmp" not in record["inputs"]["flags"] and record["inputs"]["openmp_runtime"] is None
    warned = [r.getMessage() for r in caplog.records if "one thread" in r.getMessage()]
    assert len(warned) == 1 and "no OpenMP runtime" in warned[0]


# --- _Float16 and its fallbacks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_builds(tmp_path_factory):
    """The library built with each way of widening halves, loaded: {conversion: (library, limits)}."""
    builds = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOUBLESPARSE_CACHE_DIR", str(tmp_path_factory.mktemp("halves")))
        for extra in ([], ["-DDOUBLESPARSE_NO_FLOAT16"], ["-DDOUBLESPARSE_NO_FLOAT16", "-DDOUBLESPARSE_NO_F16C"]):
            library = native._build(native._compiler(), FLAGS + extra)
            lib, limits = native.open_library(library)
            builds[limits.half_conversion] = (library, lib, limits)
    assert "software" in builds and len(builds) >= 2  # the fallback was really built
    return builds


@pytest.fixture
def use_build(monkeypatch):
    """Run the kernels through another loaded build of the library."""

    def use(build):
        library, lib, limits = build
        monkeypatch.setattr(native, "native_build", lambda: native.NativeBuild(lib, library, limits, []))

    return use


def test_every_half_conversion_widens_all_halves_exactly(half_builds):
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    expected = halves.view(torch.float16).float()
    widened = {}
    for name, (_, lib, _) in half_builds.items():
        out = torch.empty(halves.numel(), dtype=torch.float32)
        lib.doublesparse_halves_to_floats(halves.data_ptr(), out.data_ptr(), halves.numel())
        widened[name] = out
        finite = ~expected.isnan()
        assert torch.equal(out[finite].view(torch.int32), expected[finite].view(torch.int32)), name
        assert out[~finite].isnan().all(), name
    first = next(iter(widened.values()))
    assert all(torch.equal(w.view(torch.int32), first.view(torch.int32)) for w in widened.values())  # NaNs alike too


def test_the_float16_less_builds_give_the_same_results(half_builds, use_build):
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 700, 64, generator=generator)
    values = torch.randn(2, 2, 700, 64, generator=generator)
    labels = make_labels_reference(keys, torch.randperm(64, generator=generator)[:16].expand(2, -1), 4)
    query = torch.randn(2, 8, 1, 64, generator=generator)
    q_labels = torch.randn(2, 8, 1, 16, generator=generator)
    results = {}
    for name, build in half_builds.items():
        use_build(build)
        scores = label_scores_cpu(q_labels, labels, 4, 0.125, 2).clone()
        valid, budgets = torch.ones(2, 1, 700, dtype=torch.bool), torch.full((2, 1), 60)
        indices, slot_valid = select_tokens_cpu(scores, valid, budgets, 2, 4, 64)
        attended = [
            sparse_attention_cpu(query.to(dtype), keys.to(dtype), values.to(dtype), indices, slot_valid, 0.125).clone()
            for dtype in (torch.float16, torch.bfloat16, torch.float32)
        ]
        results[name] = (scores, indices.clone(), *attended)
    first = next(iter(results.values()))
    for name, result in results.items():
        assert all(torch.equal(a, b) for a, b in zip(result, first)), name
    assert torch.allclose(first[0], label_scores_reference(q_labels, labels, 4, 0.125, 2), atol=1e-5)


OTHER_COMPILERS = [name for name in ("gcc-11", "gcc-10", "gcc-9", "clang-14", "clang") if shutil.which(name)]


@pytest.mark.skipif(not OTHER_COMPILERS, reason="no other C compiler here")
@pytest.mark.parametrize("compiler", OTHER_COMPILERS)
def test_other_compilers_build_kernels_that_match_the_references(compiler, cache):
    """GCC 11 has no _Float16 on x86; clang's OpenMP code calls __kmpc_*, which torch's libgomp lacks."""
    build = native.load_native(shutil.which(compiler))
    assert build.library is not None, build.problems
    if build.limits.openmp == 0:  # it could not share torch's runtime: say why, and still run
        assert any("OpenMP" in problem or "omp" in problem for problem in build.problems)
    generator = torch.Generator().manual_seed(6)
    keys = torch.randint(-8, 8, (2, 2, 300, 32), generator=generator).float()
    labels = make_labels_reference(keys, torch.arange(16).expand(2, -1), 4)
    labels = labels._replace(scale=torch.full_like(labels.scale, 0.5), offset=torch.full_like(labels.offset, -4.0))
    q_labels = torch.randint(-3, 4, (2, 8, 1, 16), generator=generator).float()
    values = torch.randn(2, 2, 300, 32, generator=generator).half()
    query = torch.randn(2, 8, 1, 32, generator=generator).half()
    valid, budgets = torch.ones(2, 1, 300, dtype=torch.bool), torch.full((2, 1), 40)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "native_build", lambda: build)
        scores = label_scores_cpu(q_labels, labels, 4, 0.125, 2).clone()
        indices, slot_valid = select_tokens_cpu(scores, valid, budgets, 1, 2, 40)
        attended = sparse_attention_cpu(query, keys.half(), values, indices, slot_valid, 0.125)
    assert torch.equal(scores, label_scores_reference(q_labels, labels, 4, 0.125, 2))
    reference_indices, _ = select_tokens_reference(scores, valid, budgets, 1, 2, 40)
    assert torch.equal(indices.sort(dim=-1).values, reference_indices.sort(dim=-1).values)
    expected = sparse_attention_reference(query, keys.half(), values, indices, slot_valid, 0.125)
    assert (attended.float() - expected.float()).abs().max() <= 2e-3


# --- limits read from the library ------------------------------------------------------------------


def test_the_limits_are_the_buffer_sizes_in_the_c_source():
    source = "\n".join(path.read_text() for path in native.SOURCES)
    defines = dict(re.findall(r"#define (MAX_\w+) (\d+)", source))
    limits = native.native_limits()
    assert limits.max_group_heads == int(defines["MAX_GROUP_HEADS"])
    assert limits.max_group_accumulator == int(defines["MAX_ACCUMULATOR"])
    assert limits.max_head_dim == int(defines["MAX_HEAD_DIM"])
    assert limits.max_select_tokens == 2**32 - 1


def test_python_follows_the_limits_the_library_reports(monkeypatch):
    query, keys = torch.zeros(1, 8, 1, 64), torch.zeros(1, 2, 10, 64)
    indices, slot_valid = torch.zeros(1, 2, 1, 4, dtype=torch.long), torch.ones(1, 1, 1, 4, dtype=torch.bool)
    assert sparse_attention_cpu_supports(query, keys, keys, indices)
    limits = native.native_limits()
    smaller_limits = [{"max_group_heads": 2}, {"max_head_dim": 32}, {"max_group_accumulator": 128}]
    for smaller in smaller_limits + [{"max_select_tokens": 9}]:
        monkeypatch.setattr(native, "native_limits", lambda smaller=smaller: limits._replace(**smaller))
        if "max_select_tokens" in smaller:
            with pytest.raises(ValueError, match="at most 9 tokens"):
                valid = torch.ones(1, 1, 10, dtype=torch.bool)
                select_tokens_cpu(torch.zeros(1, 1, 1, 10), valid, torch.ones(1, 1), 0, 1, 1)
            continue
        assert not sparse_attention_cpu_supports(query, keys, keys, indices)
        out = dispatch.sparse_attention(query, keys, keys, indices, slot_valid, 0.1, "cpu")  # the reference serves it
        assert torch.equal(out, sparse_attention_reference(query, keys, keys, indices, slot_valid, 0.1))


# --- torch.library ops and torch.compile ------------------------------------------------------------


def op_cases():
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 2, 300, 64, generator=generator)
    labels = make_labels_reference(keys, torch.arange(8).expand(2, -1), 4)
    q_labels = torch.randn(2, 8, 1, 8, generator=generator)
    scores = label_scores_cpu(q_labels, labels, 4, 0.125, 2).clone()
    valid = torch.ones(2, 1, 300, dtype=torch.bool).tril(290)[:, :1]
    budgets = torch.tensor([[30], [17]])
    indices, slot_valid = select_tokens_cpu(scores, valid, budgets, 1, 4, 32)
    query, values = torch.randn(2, 8, 1, 64, generator=generator), torch.randn(2, 2, 300, 64, generator=generator)
    return {
        "label_scores_int4": (
            lambda q, c, s, o: label_scores_cpu(q, Labels(c, s, o), 4, 0.125, 2),
            (q_labels, *labels),
        ),
        "select_tokens": (lambda s, v, b: select_tokens_cpu(s, v, b, 1, 4, 32), (scores, valid, budgets)),
        "sparse_attention": (
            lambda q, k, v, i, m: sparse_attention_cpu(q, k, v, i, m, 0.125),
            (query, keys.half(), values.half(), indices.clone(), slot_valid),
        ),
    }


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])  # one small graph: quick with inductor too
@pytest.mark.parametrize("name", ["label_scores_int4", "select_tokens", "sparse_attention"])
def test_each_native_op_compiles_without_graph_breaks_and_equals_eager(name, compile_backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    function, args = op_cases()[name]
    counter = CompileCounterWithBackend(compile_backend)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(function, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1 and f"doublesparse.{name}" in counter.graphs[0].code
    eager = function(*args)
    if not isinstance(eager, tuple):
        compiled, eager = (compiled,), (eager,)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    assert not [str(w.message) for w in caught if "native" in str(w.message) or "lru_cache" in str(w.message)]


@pytest.mark.parametrize("name", ["label_scores_int4", "select_tokens", "sparse_attention"])
def test_the_registered_ops_pass_opcheck(name):
    _, args = op_cases()[name]
    op = getattr(torch.ops.doublesparse, name)
    op_args = {
        "label_scores_int4": lambda q, c, s, o: (q, c, s, o, 2, 0.125),
        "select_tokens": lambda s, v, b: (s, v, b, 1, 4, 32),
        "sparse_attention": lambda q, k, v, i, m: (q, k, v, i, m, 0.125),
    }[name](*args)
    torch.library.opcheck(op, op_args)


# aot_eager runs the fake implementations and the functional graph inductor would receive, in seconds;
# inductor's C++ build of the same graphs takes longer on two cores, so it runs with the slow tests.
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("compile_backend", BACKENDS)
def test_a_compiled_cpu_decode_step_has_no_graph_break_and_matches_eager(compile_backend, one_thread):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model("llama", num_layers=1)
    input_ids, attention_mask = left_padded_batch([9, 6], seed=10)
    config = ds.SparsityConfig(
        num_channels=4, token_budget=3, label_bits=4, recent_tokens=1, backend="cpu", sink_tokens=0
    )
    ds.apply(model, random_channel_mask(model), config)
    eager = StaticDecoder(model, max_cache_len=16).generate(input_ids, attention_mask, 5, keep_logits=True)
    counter = CompileCounterWithBackend(compile_backend)
    torch._dynamo.reset()
    # fullgraph: any graph break in the decode step is an error.
    decoder = StaticDecoder(model, max_cache_len=16, compile=True, compile_backend=counter, fullgraph=True)
    compiled = decoder.generate(input_ids, attention_mask, 5, keep_logits=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert (compiled.logits - eager.logits).abs().max() <= 1e-4
    assert counter.frame_count == 1  # one graph serves every step: no recompilation either
    code = counter.graphs[0].code
    # One thread: every (batch row, KV head) is a whole item for the fused op (scores, selection, attention).
    assert "doublesparse.fused_decode" in code

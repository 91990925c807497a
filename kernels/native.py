"""The native CPU library (cpu_*.c, SOURCES): built at first use with the system C compiler, verified, cached.

Build key. The library is compiled for this machine (`-march=native`): a file built elsewhere may
hold instructions this CPU lacks (SIGILL). Its cache name is therefore a SHA-256 over everything the
machine code depends on: every source file, the ABI version, the compiler (path, resolved path and
`--version`), the compile and link flags, the OpenMP runtime it links, the machine and system, the
CPU model line, the CPU feature flags (`flags` of /proc/cpuinfo on x86, `Features` on ARM, sorted)
and the compiler's own expansion of `-march=native` (the `-m` options, `-target-cpu`/`-target-feature`
and `--param`s that `cc -### -march=native` would hand on, which covers systems without
/proc/cpuinfo). Two machines that differ in any of them never share a file. A portable baseline
plus runtime dispatch (`target_clones`) was the alternative; it needs ifunc (glibc only), doubles
the code per target and changes which code each machine runs. Since the library is built on the
machine that runs it anyway, `-march=native` with an exact key is simpler and keeps the kernels as
measured. Each build is run once in a child process (`doublesparse_self_test`), so a library the
compiler targeted wrongly dies there, not here.

Verification. Next to each `cpu_decode-<key>.so` lies `cpu_decode-<key>.json`, written atomically:
the key, the build inputs, the file's size and SHA-256. A cached file is loaded only if its record
matches this process's inputs and its bytes match the checksum (a truncated file would raise SIGBUS
inside dlopen, a garbled one SIGILL, so nothing is trusted before it is checked). After loading, the
library must report the key it was built under (`doublesparse_build_key`) and this ABI: another
library under the cached name is refused. On any mismatch or load failure the file is discarded
and rebuilt once; if that fails too, `native_library()` is None, `auto` runs the torch references
and one warning names the reason. Builds take a file lock, so concurrent first uses build once, and
a file is only ever replaced by rename, never rewritten in place while another process maps it.

OpenMP. The kernels run on OpenMP so that they share torch's thread pool (a second pool's threads
would compete with torch's spinning workers). Which runtime torch uses, and under which file name,
depends on the build of torch (this wheel ships torch/lib/libgomp.so.1; others ship a renamed
libgomp-<hash>.so.1, Intel's libiomp5 or LLVM's libomp). So the library is not linked with
`-fopenmp` (that would pull in the compiler's own libgomp by name): it is compiled with `-fopenmp`,
then linked to the very runtime file torch has mapped (found in /proc/self/maps) with an rpath to
its folder, and with `-z defs`, so a runtime that lacks a symbol the compiler emitted (clang's
`__kmpc_*` against libgomp) fails the build instead of the first call. The dynamic linker then
resolves that dependency to the runtime already loaded: one pool. Where torch has no OpenMP runtime
mapped (macOS, which has no /proc/self/maps, or a torch without OpenMP) or that build fails, the
library is built without OpenMP: its kernels run on one thread, and a warning says why.

_Float16. x86 GCC has it only from version 12; cpu_decode.c falls back to F16C or to a software
widening of the same bits where the compiler lacks it, with identical results (tests force each
path with -DDOUBLESPARSE_NO_FLOAT16 / -DDOUBLESPARSE_NO_F16C).

torch.compile. The kernels are registered as custom ops in native_ops.py. `native_available()`,
`native_limits()` and `native_error()` are constant results for Dynamo: it runs them once while
tracing instead of tracing into the loader.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Iterator, NamedTuple, Optional

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows, where the builds are not locked
    fcntl = None

# Every file the library is built from: the .c files are compiled, the header is included by them all.
SOURCES = tuple(
    pathlib.Path(__file__).with_name(name)
    for name in (
        "cpu_decode.h",
        "cpu_decode.c",
        "cpu_label_scores.c",
        "cpu_selection.c",
        "cpu_sparse_attention.c",
        "cpu_fused_decode.c",
    )
)
ABI_VERSION = 4
FLAG_SETS = (
    ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-fopenmp"],
    ["-O3", "-std=gnu11", "-fPIC", "-fopenmp"],  # compilers without -march=native
    ["-O3", "-march=native", "-std=gnu11", "-fPIC"],  # no OpenMP runtime to share: one thread
    ["-O3", "-std=gnu11", "-fPIC"],
)
SELF_TEST_TIMEOUT_S = 120
COMPILER_TIMEOUT_S = 600  # a hung compiler fails the build instead of the first decode step
# The OpenMP runtimes torch builds use: GNU libgomp (possibly renamed by auditwheel), Intel's, LLVM's.
OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)(-[0-9a-f]+)?\.(so(\.[0-9]+)*|dylib)$")
HALF_CONVERSIONS = ("_Float16", "F16C", "software")
_SELF_TEST = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "lib.doublesparse_build_key.restype = ctypes.c_char_p\n"
    "sys.exit(99 if lib.doublesparse_build_key().decode() != sys.argv[2] else lib.doublesparse_self_test())\n"
)

logger = logging.getLogger(__name__)
_LOADED: list[NativeBuild] = []  # the process-wide cache of the loaded library: empty until the first use
_FIRST_LOAD = threading.Lock()


class NativeLimits(NamedTuple):
    """The sizes of the library's fixed buffers and how it was built, as the library reports them."""

    max_group_heads: int  # query heads per selection head in sparse attention
    max_group_accumulator: int  # query heads per selection head x head_dim
    max_head_dim: int
    max_select_tokens: int  # cached tokens a selection row may index
    half_conversion: str  # how fp16 is widened: one of HALF_CONVERSIONS
    openmp: int  # the _OPENMP version it was built with, 0 for one thread


class _Info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "struct_size",
            "abi_version",
            "max_group_heads",
            "max_group_accumulator",
            "max_head_dim",
            "max_select_tokens",
            "half_conversion",
            "openmp",
        )
    ]


@dataclasses.dataclass
class NativeBuild:
    """What loading found: the library (None where unavailable), its file and limits, and every problem met."""

    library: Optional[ctypes.CDLL]
    path: Optional[pathlib.Path]
    limits: Optional[NativeLimits]
    problems: list[str]


class BuildError(RuntimeError):
    """The library could not be built with one flag set."""


class LoadError(RuntimeError):
    """A built or cached file failed verification or loading."""


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept: $DOUBLESPARSE_CACHE_DIR, else the user cache directory."""
    explicit = os.environ.get("DOUBLESPARSE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "doublesparse" / "native"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpuinfo_line(prefixes: tuple[str, ...]) -> Optional[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line.split(":", 1)[1].strip() if ":" in line else ""
    except OSError:
        pass
    return None


def cpu_features() -> list[str]:
    """The CPU's feature flags, sorted: /proc/cpuinfo `flags` (x86) or `Features` (ARM); [] where absent."""
    line = _cpuinfo_line(("flags", "Features"))
    return sorted(set(line.split())) if line else []


def compiler_target(compiler: str) -> list[str]:
    """What `-march=native` means to `compiler` on this machine: the target options its driver hands on."""
    try:
        result = subprocess.run(
            [compiler, "-###", "-march=native", "-E", "-x", "c", os.devnull],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILER_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return [f"unknown: {error}"]
    if result.returncode != 0:
        return [f"unsupported: {result.stderr.strip()[-200:]}"]
    options = []
    for line in result.stderr.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        # Only target options: the rest of these lines holds paths (the working directory for clang).
        for before, word in zip([""] + words, words):
            if word.startswith("-m") or before in ("-target-cpu", "-target-feature", "--param"):
                options.append(word)
    return options


def openmp_runtime() -> Optional[str]:
    """The file of the OpenMP runtime torch has loaded in this process (from /proc/self/maps), or None."""
    found = _mapped_openmp_runtimes()  # torch's CPU library, and its runtime, are mapped by `import torch`
    if not found:
        return None
    torch_lib = str(pathlib.Path(torch.__file__).parent / "lib")
    # Prefer the one torch ships, then GNU's (the ABI GCC's -fopenmp code calls), in a stable order.
    return min(found, key=lambda path: (not path.startswith(torch_lib), "gomp" not in os.path.basename(path), path))


def _mapped_openmp_runtimes() -> set[str]:
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    fields = (line.split(None, 5) for line in maps.splitlines())
    paths = {parts[5] for parts in fields if len(parts) == 6 and parts[5].startswith("/")}
    return {path for path in paths if OPENMP_RUNTIME.match(os.path.basename(path)) and os.path.exists(path)}


def build_inputs(compiler: str, flags: list[str]) -> dict:
    """Everything the built library depends on (the build key is their hash); BuildError if OpenMP has no runtime."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=False, timeout=COMPILER_TIMEOUT_S
        ).stdout
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"{compiler} --version did not answer in {COMPILER_TIMEOUT_S} s") from error
    runtime = None
    link = ["-shared", "-lm"]
    if "-fopenmp" in flags:
        runtime = openmp_runtime()
        if runtime is None:
            raise BuildError("torch has no OpenMP runtime loaded in this process for the library to share")
        link += [runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}"]
    if platform.system() == "Linux":
        link.append("-Wl,-z,defs")
    return {
        "source_sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in SOURCES},
        "abi_version": ABI_VERSION,
        "compiler": compiler,
        "compiler_realpath": os.path.realpath(compiler),
        "compiler_version": version.strip(),
        "flags": list(flags),
        "link": link,
        "openmp_runtime": runtime,
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_model": _cpuinfo_line(("model name", "CPU part")) or platform.processor(),
        "cpu_features": cpu_features(),
        "native_target": compiler_target(compiler),
    }


def build_key(inputs: dict) -> str:
    """The cache key of a build: a hash of its inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _record_path(library: pathlib.Path) -> pathlib.Path:
    return library.with_suffix(".json")


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: pathlib.Path, text: str) -> None:
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide the record from other users of a shared cache
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def verify_cached(library: pathlib.Path, inputs: dict) -> Optional[str]:
    """Why the cached `library` must not be loaded for these build inputs, or None if it matches its record."""
    if not library.exists():
        return "no cached library"
    try:
        record = json.loads(_record_path(library).read_text())
    except (OSError, ValueError) as error:
        return f"its record {_record_path(library).name} is missing or unreadable ({error})"
    if not isinstance(record, dict):
        return f"its record {_record_path(library).name} is not a build record"
    if record.get("key") != build_key(inputs) or record.get("inputs") != json.loads(json.dumps(inputs)):
        return "it was recorded for other build inputs (another compiler, flags or CPU)"
    size = library.stat().st_size
    if size != record.get("size"):
        return f"it holds {size} bytes, {record.get('size')} were recorded (truncated or replaced)"
    if _sha256(library) != record.get("sha256"):
        return "its SHA-256 differs from the recorded one (corrupted or replaced)"
    return None


@contextlib.contextmanager
def _build_lock(library: pathlib.Path) -> Iterator[None]:
    library.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(open(library.with_suffix(".lock"), "a"))
        except OSError:  # a read-only cache still serves the libraries it verifies
            lock = None
        if lock is not None and fcntl is not None:  # Windows builds go unlocked
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _discard(library: pathlib.Path) -> None:
    for path in (library, _record_path(library)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=COMPILER_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"{what} did not finish in {COMPILER_TIMEOUT_S} s: {shlex.join(command)}") from error
    if result.returncode != 0:
        raise BuildError(f"{what} failed: {shlex.join(command)}\n{result.stderr.strip()[-2000:]}")


def _self_test(library: pathlib.Path, key: str) -> None:
    if not sys.executable:  # pragma: no cover - embedded interpreters: nothing to run the test with
        return
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-c", _SELF_TEST, str(library), key],
            capture_output=True,
            text=True,
            check=False,
            timeout=SELF_TEST_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"the built library's self test did not finish in {SELF_TEST_TIMEOUT_S} s") from error
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise BuildError(f"the built library crashed its self test ({name}): compiled for instructions this CPU lacks?")
    if result.returncode != 0:
        detail = result.stderr.strip()[-500:]
        raise BuildError(f"the built library failed its self test (status {result.returncode}) {detail}")


def _compile(compiler: str, inputs: dict, key: str, library: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory(dir=library.parent, prefix=".build-") as work:
        built = pathlib.Path(work) / library.name
        define = f'-DDOUBLESPARSE_BUILD_KEY="{key}"'
        objects = []
        for source in (path for path in SOURCES if path.suffix == ".c"):
            objects.append(os.path.join(work, source.with_suffix(".o").name))
            _run([compiler, *inputs["flags"], define, "-c", str(source), "-o", objects[-1]], f"compiling {source.name}")
        _run([compiler, *objects, "-o", str(built), *inputs["link"]], "linking the native library")
        _self_test(built, key)
        record = {"key": key, "sha256": _sha256(built), "size": built.stat().st_size, "inputs": inputs}
        # Record first, library last: whoever sees the library also sees its record.
        _write_atomically(_record_path(library), json.dumps(record, indent=1, sort_keys=True))
        os.replace(built, library)


def _build(compiler: str, flags: list[str], rebuild: bool = False) -> pathlib.Path:
    """The verified cached library for these flags, built (and recorded) first where needed; BuildError if it fails."""
    inputs = build_inputs(compiler, flags)
    key = build_key(inputs)
    library = cache_dir() / f"cpu_decode-{key}.so"
    with _build_lock(library):
        problem = None if rebuild else verify_cached(library, inputs)
        if problem is None and not rebuild:
            return library
        if library.exists():
            reason = problem or "it did not load"
            logger.warning("discarding the cached native library %s (%s); rebuilding it", library, reason)
        _discard(library)
        _compile(compiler, inputs, key, library)
    return library


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.doublesparse_info.restype = None
    lib.doublesparse_info.argtypes = [ctypes.POINTER(_Info)]
    lib.doublesparse_halves_to_floats.restype = None
    lib.doublesparse_halves_to_floats.argtypes = [ptr, ptr, i64]
    lib.doublesparse_label_scores.restype = None
    lib.doublesparse_label_scores.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr] + [i64] * 7 + [f32, i32]
    lib.doublesparse_select_tokens.restype = None
    lib.doublesparse_select_tokens.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr] + [i64] * 7 + [i32]
    lib.doublesparse_sparse_attention.restype = None
    lib.doublesparse_sparse_attention.argtypes = (
        [ptr, ptr, ptr, i64, i64, i64, ptr, ptr] + [i64] * 4 + [ptr, ptr] + [i64] * 7 + [i32, f32, i32]
    )
    lib.doublesparse_read_rows.restype = ctypes.c_uint64
    lib.doublesparse_read_rows.argtypes = [ptr, i64, i64, ptr, i64, i32]
    lib.doublesparse_fused_workspace_bytes.restype = i64
    lib.doublesparse_fused_workspace_bytes.argtypes = [i64, i64, i64]
    lib.doublesparse_fused_decode.restype = ctypes.c_int
    lib.doublesparse_fused_decode.argtypes = (
        [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr]
        + [ptr, i64, i64, i64, ptr, ptr]
        + [i64] * 12
        + [i32, f32, i32]
    )


def open_library(library: pathlib.Path, fresh_name: bool = False) -> tuple[ctypes.CDLL, NativeLimits]:
    """Load a verified library file and check it is the one built under its name; LoadError if not.

    dlopen hands back whatever it loaded before under the same path string: `fresh_name` opens the
    file under another spelling of its path, so a rebuilt file is loaded even where a foreign one
    was loaded (and refused) under its name earlier in this process.
    """
    key = library.stem.split("-", 1)[-1]
    runtimes_before = _mapped_openmp_runtimes()
    try:
        lib = ctypes.CDLL(os.path.join(str(library.parent), ".", library.name) if fresh_name else str(library))
    except OSError as error:
        raise LoadError(f"{library.name} does not load: {error}") from error
    try:
        lib.doublesparse_build_key.restype = ctypes.c_char_p
        lib.doublesparse_abi_version.restype = ctypes.c_int
        found_key, found_abi = lib.doublesparse_build_key(), lib.doublesparse_abi_version()
        _declare(lib)
    except AttributeError as error:
        raise LoadError(f"{library.name} is not doublesparse's library ({error})") from error
    if found_key != key.encode() or found_abi != ABI_VERSION:
        raise LoadError(
            f"{library.name} reports key {found_key!r} and ABI {found_abi}, expected {key!r} and {ABI_VERSION}"
        )
    info = _Info()
    lib.doublesparse_info(ctypes.byref(info))
    if info.struct_size != ctypes.sizeof(_Info):
        raise LoadError(f"{library.name} describes itself in {info.struct_size} bytes, {ctypes.sizeof(_Info)} expected")
    second = _mapped_openmp_runtimes() - runtimes_before
    if second:
        others = ", ".join(sorted(second))
        logger.warning("loading %s mapped another OpenMP runtime beside torch's: %s", library.name, others)
    known = 0 <= info.half_conversion < len(HALF_CONVERSIONS)
    half_conversion = HALF_CONVERSIONS[info.half_conversion] if known else f"unknown ({info.half_conversion})"
    limits = NativeLimits(
        info.max_group_heads,
        info.max_group_accumulator,
        info.max_head_dim,
        info.max_select_tokens,
        half_conversion,
        info.openmp,
    )
    return lib, limits


def load_native(compiler: Optional[str] = None) -> NativeBuild:
    """Build (or find in the cache), verify and load the library, trying each flag set; never raises."""
    compiler = compiler or _compiler()
    if compiler is None:
        return NativeBuild(None, None, None, ["no C compiler found (set CC, or install cc/gcc/clang)"])
    problems: list[str] = []
    for flags in FLAG_SETS:
        for rebuild in (False, True):  # a file that fails to load is rebuilt once
            try:
                library = _build(compiler, flags, rebuild=rebuild)
                lib, limits = open_library(library, fresh_name=rebuild)
            except BuildError as error:
                problems.append(f"[{' '.join(flags)}] {error}")
                break
            except (LoadError, OSError) as error:
                problems.append(f"[{' '.join(flags)}] {error}")
                continue
            if "-fopenmp" not in flags:
                reasons = "\n".join(problems)
                logger.warning("the native CPU kernels run on one thread (built without OpenMP):\n%s", reasons)
            return NativeBuild(lib, library, limits, problems)
    return NativeBuild(None, None, None, problems)


def native_build() -> NativeBuild:
    """The process-wide result of `load_native()`: loaded once, with one warning where it failed."""
    if not _LOADED:  # every kernel call asks: only the first takes the lock
        with _FIRST_LOAD:  # threads that start decoding together load (and warn) once
            if not _LOADED:
                build = load_native()
                if build.library is None:
                    logger.warning(
                        "the native CPU kernels are unavailable, so backend='auto' runs the torch references on "
                        "CPU tensors:\n%s",
                        "\n".join(build.problems),
                    )
                _LOADED.append(build)
    return _LOADED[0]


def native_library() -> Optional[ctypes.CDLL]:
    """The loaded library, built on first use; None where it cannot be built here (see native_error)."""
    return native_build().library


@torch.compiler.assume_constant_result
def native_available() -> bool:
    """Whether the native CPU kernels can run here."""
    return native_library() is not None


@torch.compiler.assume_constant_result
def native_error() -> str:
    """Why the native library is unavailable ('' when it is available)."""
    return "" if native_library() is not None else "\n".join(native_build().problems)


@torch.compiler.assume_constant_result
def native_limits() -> Optional[NativeLimits]:
    """The loaded library's limits (None where it is unavailable)."""
    return native_build().limits  # None where no library was loaded


def require_native() -> None:
    """ValueError, saying why and what to use instead, where the native kernels cannot run (traceable)."""
    if not native_available():
        raise ValueError(f"the native CPU kernels could not be built here; use backend='torch':\n{native_error()}")


def require_library() -> ctypes.CDLL:
    """The loaded library, or a ValueError that says why it is missing and what to use instead."""
    lib = native_library()
    if lib is None:
        raise ValueError(f"the native CPU kernels could not be built here; use backend='torch':\n{native_error()}")
    return lib

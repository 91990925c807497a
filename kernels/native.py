"""The native CPU library (cpu_decode.c): built at first use with the system C compiler, then cached.

The library is compiled for this machine (`-march=native`), so the cached file is keyed by the
source, the compiler, the flags and the CPU model; it is written atomically (compiled to a temporary
name, then renamed), so concurrent first uses never load a half-written file. Where no compiler is
found or the build fails, `native_library()` returns None and `native_error()` says why: the `auto`
backend then falls back to the torch references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

SOURCE = pathlib.Path(__file__).with_name("cpu_decode.c")
ABI_VERSION = 1
FLAG_SETS = (
    ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp"],  # compilers without -march=native
    ["-O3", "-std=gnu11", "-fPIC", "-shared"],  # nor OpenMP: the kernels then run on one thread
)
_errors: list[str] = []


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


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: list[str]) -> pathlib.Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    identity = "\n".join([SOURCE.read_text(), compiler, version, " ".join(flags), platform.machine(), _cpu_model()])
    target = cache_dir() / f"cpu_decode-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.doublesparse_abi_version.restype = i32
    lib.doublesparse_label_scores.restype = None
    lib.doublesparse_label_scores.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr] + [i64] * 7 + [f32, i32]
    lib.doublesparse_select_tokens.restype = None
    lib.doublesparse_select_tokens.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr] + [i64] * 7 + [i32]
    lib.doublesparse_sparse_attention.restype = None
    lib.doublesparse_sparse_attention.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ptr] + [i64] * 4 + [ptr, ptr] + [i64] * 7 + [i32, f32, i32]


@functools.lru_cache(maxsize=None)
def native_library() -> Optional[ctypes.CDLL]:
    """The loaded library, built on first use; None where it cannot be built here (see native_error)."""
    compiler = _compiler()
    if compiler is None:
        _errors.append("no C compiler found (set CC, or install cc/gcc/clang)")
        return None
    for flags in FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
        except (OSError, RuntimeError) as error:
            _errors.append(str(error))
            continue
        _declare(lib)
        if lib.doublesparse_abi_version() != ABI_VERSION:
            _errors.append(f"library ABI {lib.doublesparse_abi_version()} != {ABI_VERSION}")
            continue
        return lib
    return None


def native_available() -> bool:
    """Whether the native CPU kernels can run here."""
    return native_library() is not None


def require_library() -> ctypes.CDLL:
    """The loaded library, or a ValueError that says why it is missing and what to use instead."""
    lib = native_library()
    if lib is None:
        raise ValueError(f"the native CPU kernels could not be built here; use backend='torch':\n{native_error()}")
    return lib


def native_error() -> str:
    """Why the native library is unavailable ('' when it is available or not yet tried)."""
    return "\n".join(_errors)

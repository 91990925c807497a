"""Where a C compiler is found, the native library builds and passes its self test.

The native kernel tests skip where the library is unavailable; this one does not, so a library that
stops building (a compile error, a failing self test) fails the suite instead of skipping it.
"""

import pytest

from doublesparse.kernels import native


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")
def test_the_native_library_builds_where_a_compiler_is_found():
    assert native.native_available(), native.native_error()

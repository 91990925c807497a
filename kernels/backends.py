"""The kernel backends a `SparsityConfig` can name; importable without torch (command-line help lists them)."""

BACKENDS = ("auto", "torch", "triton", "cpu")

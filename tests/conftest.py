"""Test setup: Triton kernels run under the interpreter unless a GPU is present."""

import os
import pathlib

# Must be set before any kernel module imports triton.
if "TRITON_INTERPRET" not in os.environ and not pathlib.Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the environment above)
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models decode faster on one thread, and the machine is shared (use with usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

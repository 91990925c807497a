"""Test setup: Triton kernels run under the interpreter unless a GPU is present."""

import os
import pathlib

# Must be set before any kernel module imports triton.
if "TRITON_INTERPRET" not in os.environ and not pathlib.Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

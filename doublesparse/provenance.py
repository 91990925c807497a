"""What a result file records about where it came from: versions, commit, device."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, Optional


def versions() -> dict[str, Optional[str]]:
    """Versions of Python and of the libraries a result depends on."""
    import torch
    import transformers

    import doublesparse

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "doublesparse": doublesparse.__version__,
    }
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    return found


def git_commit() -> Optional[str]:
    """The checkout's commit (with -dirty when tracked files changed), or None outside git."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty.strip() else "")


def device_name(device: Any) -> str:
    """A readable name of a torch device: the GPU's name, or the CPU model."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: Any) -> dict[str, Any]:
    """Versions, commit, device name and CPU threads, for a result file."""
    import torch

    return {
        "versions": versions(),
        "commit": git_commit(),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
    }

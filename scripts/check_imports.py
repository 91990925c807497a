"""Check the import contracts (.importlinter) on the package laid out as it installs.

`kernels/`, `calibration/` and `eval/` sit at the top of the repository but install as subpackages of
`doublesparse` (setup.py's package_dir). import-linter finds modules by walking the package folder,
so this copies the sources into that installed layout in a temporary folder and checks it there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed subpackage -> its folder in the repository (the package_dir mapping of setup.py).
LAYOUT = {
    "doublesparse": "doublesparse",
    "doublesparse/kernels": "kernels",
    "doublesparse/calibration": "calibration",
    "doublesparse/eval": "eval",
}


def stage(target: Path) -> None:
    """Copy the Python sources into `target` in the installed layout."""
    for installed, source in LAYOUT.items():
        shutil.copytree(
            ROOT / source,
            target / installed,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("assets", "__pycache__", "*.c", "*.so"),
        )


def main() -> int:
    """Stage the package and run lint-imports on it; return its exit status."""
    with tempfile.TemporaryDirectory(prefix="doublesparse-imports-") as folder:
        stage(Path(folder))
        env = {**os.environ, "PYTHONPATH": folder}
        command = [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            str(ROOT / ".importlinter"),
        ]
        return subprocess.run(command, cwd=folder, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Output paths checked before any work: a command that could not write its result refuses at the start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def check_output_file(path: Union[str, os.PathLike], option: str) -> Path:
    """The path of a file to write, or ValueError (naming `option`) if it cannot be written there.

    Refused: a folder, a path under an existing file, and a place where no file can be created (a
    read-only file system, a folder without write permission). Missing folders are fine: they are
    created when the file is written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder: name the file to write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be written: {str(folder)!r} is a file, not a folder")
    # Permission bits do not stop root, and a read-only file system shows only on writing: try it.
    try:
        handle, probe = tempfile.mkstemp(prefix=".doublesparse-write-check-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"{option} {str(path)!r} cannot be written: no file can be created in {str(folder)!r} "
            f"({error.strerror or error})"
        ) from None
    return path

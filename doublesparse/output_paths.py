"""Output files: checked writable before a command's work starts, then written atomically.

A command that could not write its result refuses at the start (`check_output_file`,
`check_output_folder`, `check_image_file`), not after the run it would lose. Every file is written
through `atomic_write`: into a temporary file beside it, renamed over it when complete, so that an
error or a Ctrl-C (KeyboardInterrupt) in the middle leaves the previous file, or none, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Union

PathLike = Union[str, os.PathLike]

# Formats matplotlib writes, by file suffix.
IMAGE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def check_output_file(path: PathLike, option: str) -> Path:
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


def check_output_folder(folder: PathLike, option: str, names: Iterable[str]) -> list[Path]:
    """The paths of files `names` to write in `folder` (a folder to write into, made if missing); ValueError if not."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {str(folder)!r} is a file: name a folder to write the results into")
    paths = []
    for name in names:
        path = folder / name
        if path.is_dir():
            raise ValueError(f"{option} {str(folder)!r}: {str(path)!r} is a folder, where the file {name} goes")
        paths.append(check_output_file(path, option))
    return paths


def image_format(path: PathLike, option: str) -> str:
    """The image format of `path` from its suffix (png without one); ValueError for a suffix matplotlib cannot write."""
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix and suffix not in IMAGE_FORMATS:
        raise ValueError(f"{option} {str(path)!r}: images are written as {', '.join(IMAGE_FORMATS)}, not {suffix!r}")
    return suffix or "png"


def check_image_file(path: PathLike, option: str) -> Path:
    """`check_output_file` for an image, whose suffix must also name a format matplotlib writes."""
    image_format(path, option)
    return check_output_file(path, option)


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`.

    On any error, KeyboardInterrupt included, the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure(figure: Any, path: PathLike, dpi: int = 120) -> None:
    """Write a matplotlib figure to `path` atomically, in the format its suffix names (png without one)."""
    fmt = image_format(path, "figure")
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=fmt))

"""Real English prose that every CPython ships: the help topics of `pydoc_data/topics.py`.

The file is read as text and its `topics` dict parsed with `ast.literal_eval` (never imported). Its
topics are split by name, in sorted order, into two disjoint parts: every fourth topic is calibration
text and the other three quarters are held out (perplexity windows, retrieval haystacks). Named
sources: `pydoc-topics:calibration` and `pydoc-topics:heldout`. The text differs a little between
Python versions, so result files record the Python version and the file's SHA-256.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PREFIX = "pydoc-topics"
SPLITS = ("calibration", "heldout")
CALIBRATION_EVERY = 4  # topic i (sorted by name) is calibration text when i % 4 == 3


def topics_path() -> Path:
    """Path of `pydoc_data/topics.py` in this Python's standard library; ValueError where it is missing."""
    spec = importlib.util.find_spec("pydoc_data")
    origin = getattr(spec, "origin", None) if spec is not None else None
    path = Path(origin).parent / "topics.py" if origin else None
    if path is None or not path.is_file():
        raise ValueError("this Python has no pydoc_data/topics.py: pass another text file")
    return path


@lru_cache(maxsize=1)
def read_topics() -> dict[str, str]:
    """Topic name -> text, parsed from the file without importing it."""
    tree = ast.parse(topics_path().read_text(encoding="utf-8"))
    for node in tree.body:
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(getattr(t, "id", None) == "topics" for t in targets):
            topics = ast.literal_eval(node.value)
            if isinstance(topics, dict) and topics and all(isinstance(v, str) for v in topics.values()):
                return topics
    raise ValueError(f"{topics_path()} holds no `topics` dict of strings: pass another text file")


def is_topics_source(source: str) -> bool:
    """Whether `source` names the pydoc topics (`pydoc-topics:<split>`)."""
    return str(source).split(":", 1)[0] == PREFIX


def topic_documents(source: str) -> list[str]:
    """The topics of the split `source` names (`pydoc-topics:calibration` or `:heldout`), in name order."""
    _, _, split = str(source).partition(":")
    if split not in SPLITS:
        raise ValueError(f"{source!r}: name the split, {' or '.join(f'{PREFIX}:{s}' for s in SPLITS)}")
    topics = read_topics()
    names = sorted(topics)
    keep = [i % CALIBRATION_EVERY == CALIBRATION_EVERY - 1 for i in range(len(names))]
    if split == "heldout":
        keep = [not k for k in keep]
    return [topics[name] for name, k in zip(names, keep) if k]


def topic_text(source: str) -> str:
    """The split's topics joined by blank lines: one long text."""
    return "\n\n".join(topic_documents(source))


def topics_fingerprint() -> dict[str, str]:
    """The file's path and SHA-256, for result files."""
    path = topics_path()
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

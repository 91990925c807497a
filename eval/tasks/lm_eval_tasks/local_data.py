"""Loaders for the offline lm-eval tasks: jsonl files next to this module, no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rows(file_name: str) -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parent / file_name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_split(file_name: str, **_: Any):
    """A DatasetDict with one "test" split read from `file_name` (lm-eval's custom_dataset hook)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(file_name))})


def python_mc(**kwargs: Any):
    """The multiple-choice Python completion questions."""
    return load_split("python_mc.jsonl", **kwargs)


def kv_loglikelihood(**kwargs: Any):
    """The key-value retrieval contexts and their answers."""
    return load_split("kv_loglikelihood.jsonl", **kwargs)

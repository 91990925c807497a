"""Calibration data: reading documents, tokenizing and packing them into blocks, sampling blocks from a seed.

Sources: a text file, a folder of .txt files (each file one document), a jsonl file (one document per
line, text in a chosen field), a dataset saved with `datasets` (`save_to_disk` folder), or a `datasets`
name (`name` or `name:config`). `datasets` is imported only for the last two.

Packing: documents, visited in an order drawn from the seed, are tokenized without special tokens and
joined by EOS into one stream that is cut into blocks of `seq_len` tokens, each opening with BOS when
the tokenizer has one (as a model usually sees text); the tail shorter than a block is dropped. Then
`num_samples` blocks are drawn without replacement with a seeded generator. Tokenizing stops once the
pool holds `POOL_FACTOR` times the tokens needed, so a large corpus costs no more than a small one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
POOL_FACTOR = 4
PIECE_CHARS = 1 << 14
TOKENIZE_BATCH = 16


def default_data_path() -> Optional[Path]:
    """The corpus bundled with the default model, if it is installed."""
    import doublesparse

    path = Path(doublesparse.__file__).parent / "assets" / "default_model" / "calibration.txt"
    return path if path.is_file() else None


def source_kind(source: PathLike) -> str:
    """What a data source is: "text" (a text file or folder of .txt), "jsonl", "saved-dataset" or "dataset" (a name).

    ValueError for a path that does not exist.
    """
    path = Path(source)
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        return "saved-dataset" if any((path / name).is_file() for name in markers) else "text"
    if path.is_file():
        return "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    if str(source).startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".json"):
        raise ValueError(f"calibration data {str(source)!r} does not exist")
    return "dataset"


def read_documents(source: PathLike, *, field: str = "text", split: str = "train") -> list[str]:
    """The non-empty documents of a text file, folder of .txt, jsonl file, saved dataset, dataset name, or
    `pydoc-topics:calibration` / `pydoc-topics:heldout` (the Python help topics, see pydoc_topics.py)."""
    from .pydoc_topics import is_topics_source, topic_documents

    if is_topics_source(str(source)):
        return topic_documents(str(source))
    path = Path(source)
    kind = source_kind(source)
    if kind == "saved-dataset":
        documents = _dataset_documents(str(path), field, split, from_disk=True)
    elif kind == "dataset":
        documents = _dataset_documents(str(source), field, split, from_disk=False)
    elif kind == "jsonl":
        documents = _jsonl_documents(path, field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(
                f"folder {str(path)!r} holds no .txt files: pass a folder of .txt, a .txt or a .jsonl file"
            )
        documents = [_read_text(p) for p in files]
    else:
        documents = [_read_text(path)]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"calibration data {str(source)!r} holds no text")
    return documents


def pack_blocks(
    tokenizer: Any, documents: Sequence[str], seq_len: int, *, seed: int = 0, max_tokens: Optional[int] = None
) -> torch.Tensor:
    """Token blocks [num_blocks, seq_len] packed from `documents` (visited in an order drawn from `seed`)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=generator).tolist()
    stream: list[int] = []
    for index in order:
        if stream and eos is not None:
            stream.append(eos)
        for ids in _tokenized_pieces(tokenizer, documents[index]):
            stream.extend(ids)
            if max_tokens is not None and len(stream) >= max_tokens:
                break
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    num_blocks = len(stream) // body
    if num_blocks == 0:
        raise ValueError(
            f"the calibration data holds {len(stream)} tokens, fewer than one block of {seq_len}: "
            "pass more data or a smaller --seq-len"
        )
    blocks = torch.tensor(stream[: num_blocks * body], dtype=torch.long).view(num_blocks, body)
    if bos is not None:
        blocks = torch.cat([torch.full((num_blocks, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


def sample_blocks(blocks: torch.Tensor, num_samples: int, *, seed: int = 0) -> torch.Tensor:
    """`num_samples` blocks drawn without replacement from a generator seeded with `seed` (all if fewer)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if num_samples > len(blocks):
        logger.warning(
            "calibration data gives %d blocks, fewer than the %d asked for: using all", len(blocks), num_samples
        )
        num_samples = len(blocks)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(blocks), generator=generator)[:num_samples]
    return blocks[chosen]


def calibration_blocks(
    tokenizer: Any, documents: Sequence[str], *, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Pack `documents` and draw `num_samples` blocks of `seq_len` tokens, deterministically from `seed`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    documents = [d for d in documents if isinstance(d, str) and d.strip()]
    if not documents:
        raise ValueError("the calibration data is empty: pass at least one non-empty text")
    blocks = pack_blocks(tokenizer, documents, seq_len, seed=seed, max_tokens=POOL_FACTOR * num_samples * seq_len)
    return sample_blocks(blocks, num_samples, seed=seed)


def _tokenized_pieces(tokenizer: Any, document: str) -> Iterator[list[int]]:
    # A long document is tokenized in pieces cut at line ends, several pieces per tokenizer call, so
    # that a pool cap stops a huge file early.
    pieces = _pieces(document)
    for start in range(0, len(pieces), TOKENIZE_BATCH):
        ids: list[int] = []
        for piece_ids in tokenizer(pieces[start : start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            ids.extend(piece_ids)
        yield ids


def _pieces(text: str) -> list[str]:
    pieces = []
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from error


def _jsonl_documents(path: Path, field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(path)}:{number} is not a JSON line: {error.msg}") from error
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{str(path)}:{number} has no field {field!r}: choose the text field with --field")
            if not isinstance(record[field], str):
                raise ValueError(f"{str(path)}:{number}: field {field!r} is not a string")
            documents.append(record[field])
    return documents


def _dataset_documents(source: str, field: str, split: str, *, from_disk: bool) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"reading {source!r} needs the `datasets` package, which is not installed: "
            "pass a .txt/.jsonl file or folder"
        ) from error
    try:
        if from_disk:
            data = datasets.load_from_disk(source)
        else:
            name, _, config = source.partition(":")
            data = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # datasets raises many kinds; all mean the same to the user
        raise ValueError(
            f"cannot load dataset {source!r} ({type(error).__name__}: {error}): pass a local file or folder"
        ) from error
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {source!r} has splits {sorted(data)}, not {split!r}: choose one with --split")
        data = data[split]
    if field not in data.column_names:
        raise ValueError(f"dataset {source!r} has columns {data.column_names}, not {field!r}: choose one with --field")
    return list(data[field])

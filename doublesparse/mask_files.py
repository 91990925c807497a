"""Channel-mask files: doublesparse's safetensors format and the authors' JSON, read with every field checked.

A file that is not what it claims raises ValueError naming the file and what is wrong, before any of it
is used: truncated or garbled bytes, a header that does not describe its data, missing or malformed
metadata, tensors of the wrong kind; in the authors' JSON, anything but an object of
`model.layers.{i}.self_attn.{q,k,qk}_proj` entries, each a list of rows of integer channel indices of
one length. What the parts mean together (permutations, statistics that agree with the ranking, a
layout that fits the tensors) is checked by `ChannelMask` when it is built (channels.py).

Files are written atomically (`atomic_write`, from output_paths.py), and a mask's safetensors header
canonically (sorted keys), so that equal masks give equal files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file

from .output_paths import atomic_write

KINDS = ("q", "k", "qk")
FORMAT = "doublesparse.channel_mask"
FORMAT_VERSION = "2"  # 2 added the optional low-rank label projections
# Metadata key of the tensors' SHA-256 (content_hash): a served mask can be pinned by it.
HASH_KEY = "content_sha256"

# safetensors dtype names and their element sizes (what a header may declare).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_REQUIRED_LAYOUT = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
_OPTIONAL_LAYOUT = {"model_type": str, "name": str, "sliding_layers": list}
_ENTRY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q|k|qk)_proj")


@dataclass
class MaskFile:
    """The parts of a doublesparse mask file, each of the right type (not yet checked against each other)."""

    ranking: torch.Tensor
    kind: str
    layout: dict[str, Any]
    per_kv_head: bool
    statistics: dict[str, torch.Tensor]
    calibration: dict[str, Any]
    projection: dict[str, torch.Tensor]
    content_sha256: str = ""  # the tensors' hash (see content_hash), verified against the metadata
    hash_recorded: bool = False  # whether the file's metadata carried the hash (files before hashes did not)


def check_mask_path(path: Path) -> None:
    """ValueError unless `path` names an existing file (a folder or a missing path is said as such)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".json"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ValueError(f"channel mask {str(path)!r} is a folder, not a mask file: pass the file itself{hint}")
    if not path.exists():
        raise ValueError(f"channel mask file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"channel mask {str(path)!r} is not a regular file")


def read_mask_file(path: Path) -> MaskFile:
    """The parts of a doublesparse safetensors mask; ValueError naming the file and the fault otherwise."""
    data = _read(path)
    metadata = _checked_header(path, data).get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a doublesparse channel mask (no '{FORMAT}' format metadata): pass a mask written "
            "by doublesparse calibrate or ChannelMask.save, or the authors' .json"
        )
    version = metadata.get("format_version", FORMAT_VERSION)
    if not (isinstance(version, str) and version.isdigit()) or int(version) > int(FORMAT_VERSION):
        raise ValueError(
            f"{str(path)!r} has mask format version {version!r}; this doublesparse reads versions up to "
            f"{FORMAT_VERSION}: upgrade doublesparse"
        )
    tensors = _tensors(path, data)
    if "ranking" not in tensors:
        raise ValueError(f"{str(path)!r} has mask metadata but no 'ranking' tensor: the file is incomplete")
    statistics, projection = {}, {}
    for name, tensor in tensors.items():
        kind = name.split(".", 1)[1] if name.startswith("statistics.") else None
        side = name.split(".", 1)[1] if name.startswith("projection.") else None
        if name == "ranking":
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise ValueError(f"{str(path)!r}: the ranking holds {tensor.dtype}, not integer channel indices")
        elif kind in KINDS:
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"{str(path)!r}: statistics.{kind} holds {tensor.dtype}, not floating-point values")
            statistics[kind] = tensor
        elif side in ("key", "query"):
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"{str(path)!r}: projection.{side} holds {tensor.dtype}, not floating-point values")
            projection[side] = tensor
        else:
            raise ValueError(
                f"{str(path)!r} holds a tensor {name!r} that a channel mask does not have (ranking, statistics.q, "
                "statistics.k, statistics.qk, projection.key, projection.query)"
            )
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{str(path)!r}: mask kind {kind!r} in the metadata is not one of {KINDS}")
    per_kv_head = _json_field(path, metadata, "per_kv_head", "false")
    if not isinstance(per_kv_head, bool):
        raise ValueError(f"{str(path)!r}: per_kv_head metadata must be true or false, got {per_kv_head!r}")
    calibration = _json_field(path, metadata, "calibration", "{}")
    if not isinstance(calibration, dict):
        raise ValueError(f"{str(path)!r}: calibration metadata must be a JSON object, got {type(calibration).__name__}")
    layout = _layout_fields(path, _json_field(path, metadata, "layout", None))
    digest = content_hash(tensors)
    stored = metadata.get(HASH_KEY)
    if stored is not None and stored != digest:
        raise ValueError(
            f"{str(path)!r}: its tensors hash to sha256 {digest}, but its metadata records {stored}: the file "
            "changed after it was written (corrupted or edited); restore it or calibrate again"
        )
    return MaskFile(
        tensors["ranking"], kind, layout, per_kv_head, statistics, calibration, projection, digest, stored is not None
    )


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a mask file's tensors, independent of how the file's header is laid out.

    For each tensor in name order: its name, dtype and shape as one line `name dtype d0,d1,...` and a
    newline, then its elements' bytes in little-endian, row-major order.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name].detach().cpu().contiguous().numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        dtype = str(tensors[name].dtype).removeprefix("torch.")
        digest.update(f"{name} {dtype} {','.join(str(n) for n in array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def read_authors_json(path: Path) -> dict[str, torch.Tensor]:
    """The rankings of each kind in an authors' JSON file, [layers, rows, head_dim] int64; ValueError otherwise."""
    raw = _read(path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__} at top level; the authors' format is an object of "
            "'model.layers.{i}.self_attn.{q,k,qk}_proj' entries"
        )
    found: dict[str, dict[int, Any]] = {}
    for key, value in data.items():
        match = _ENTRY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{str(path)!r} has an entry {key!r}; the authors' format holds only "
                "'model.layers.{i}.self_attn.{q,k,qk}_proj' entries, with i a layer number"
            )
        layer, kind = int(match.group(1)), match.group(2)
        if layer in found.setdefault(kind, {}):
            raise ValueError(f"{str(path)!r} has two {kind}_proj entries for layer {layer}")
        found[kind][layer] = value
    if not found:
        raise ValueError(f"{str(path)!r} holds no 'model.layers.{{i}}.self_attn.{{q,k,qk}}_proj' entries")
    tables = {kind: _kind_table(path, kind, layers) for kind, layers in sorted(found.items())}
    shapes = {kind: (t.shape[0], t.shape[2]) for kind, t in tables.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{kind}: {layers} layers x {dim} channels" for kind, (layers, dim) in shapes.items())
        raise ValueError(f"{str(path)!r}: its kinds disagree on the layers or channels per head ({described})")
    return tables


def _kind_table(path: Path, kind: str, layers: dict[int, Any]) -> torch.Tensor:
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(
            f"{str(path)!r}: layers of kind {kind!r} are {sorted(layers)}, not numbered 0..{len(layers) - 1}"
        )
    shape = None
    for layer in range(len(layers)):
        rows = layers[layer]
        where = f"{str(path)!r}, layer {layer} of kind {kind!r}"
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{where}: expected a non-empty list of rows (one ranking per head), got {_kind_of(rows)}")
        for head, row in enumerate(rows):
            if not isinstance(row, list) or not row:
                raise ValueError(
                    f"{where}, row {head}: expected a non-empty list of channel indices, got {_kind_of(row)}"
                )
            for position, index in enumerate(row):
                if isinstance(index, bool) or not isinstance(index, int):
                    raise ValueError(
                        f"{where}, row {head}, position {position}: channel index {index!r} is not an integer"
                    )
        widths = {len(row) for row in rows}
        if len(widths) > 1:
            raise ValueError(f"{where}: rows have different lengths {sorted(widths)} (ragged rows)")
        this = (len(rows), widths.pop())
        if shape is not None and this != shape:
            raise ValueError(
                f"{where}: {this[0]} rows of {this[1]} channels, but layer 0 has {shape[0]} rows of {shape[1]}"
            )
        shape = this
    values = [layers[layer] for layer in range(len(layers))]
    if any(abs(i) >= 1 << 62 for rows in values for row in rows for i in row):
        raise ValueError(f"{str(path)!r}: kind {kind!r} holds channel indices far out of range")
    return torch.tensor(values, dtype=torch.int64)


def _kind_of(value: Any) -> str:
    return (
        f"an empty {type(value).__name__}"
        if isinstance(value, (list, dict, str)) and not value
        else type(value).__name__
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read channel mask {str(path)!r}: {error.strerror or error}") from None


def _checked_header(path: Path, data: bytes) -> dict[str, Any]:
    # The header is checked here, so that a damaged file says what is wrong instead of failing in the
    # safetensors reader (whose errors name no file).
    name = str(path)
    if len(data) < 8:
        raise ValueError(f"{name!r} is not a safetensors file: {len(data)} bytes, too short for a header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(
            f"{name!r} is not a complete safetensors file: its header claims {size} bytes but only "
            f"{len(data) - 8} follow (truncated, or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(
            f"{name!r} is not a safetensors file: its header is not JSON (corrupt or another format)"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{name!r} is not a safetensors file: its header is not a JSON object")
    available = len(data) - 8 - size
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            if entry is not None and (
                not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values())
            ):
                raise ValueError(f"{name!r}: the safetensors metadata is not a map of strings")
            continue
        _check_entry(name, tensor, entry, available)
    return header


def _check_entry(name: str, tensor: str, entry: Any, available: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{name!r}: the header entry of tensor {tensor!r} is malformed")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"{name!r}: tensor {tensor!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{name!r}: tensor {tensor!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{name!r}: tensor {tensor!r} has malformed data offsets {offsets!r}")
    if offsets[1] > available:
        raise ValueError(
            f"{name!r}: tensor {tensor!r} ends at byte {offsets[1]} of the data, which holds {available}: the file "
            "is truncated"
        )
    if math.prod(shape) * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise ValueError(f"{name!r}: tensor {tensor!r} of shape {shape} ({dtype}) does not match its data size")


def _tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:  # the reader raises its own error types; all mean a damaged file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


def _json_field(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    text = metadata.get(key, default)
    if text is None:
        raise ValueError(f"{str(path)!r} has no {key!r} metadata: the file is incomplete")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{str(path)!r}: the {key!r} metadata is not valid JSON") from None


def _layout_fields(path: Path, layout: Any) -> dict[str, Any]:
    where = f"{str(path)!r}: the layout metadata"
    if not isinstance(layout, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(layout).__name__}")
    missing = [key for key in _REQUIRED_LAYOUT if key not in layout]
    if missing:
        raise ValueError(f"{where} lacks {missing} (it has {sorted(layout)}): the file is incomplete or corrupt")
    unknown = sorted(set(layout) - set(_REQUIRED_LAYOUT) - set(_OPTIONAL_LAYOUT) - {"value_head_dim"})
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}")
    fields: dict[str, Any] = {}
    for key in _REQUIRED_LAYOUT:
        value = layout[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
        fields[key] = value
    for key, kind in _OPTIONAL_LAYOUT.items():
        value = layout.get(key, kind())
        if not isinstance(value, kind):
            raise ValueError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
        fields[key] = value
    if "value_head_dim" in layout:  # recorded only where values and keys differ in size (MLA)
        value = layout["value_head_dim"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: value_head_dim must be a positive int, got {value!r}")
        fields["value_head_dim"] = value
    sliding = fields["sliding_layers"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < fields["num_layers"] for i in sliding):
        raise ValueError(f"{where}: sliding_layers must be layer indices below {fields['num_layers']}, got {sliding!r}")
    fields["sliding_layers"] = tuple(sliding)
    return fields


def save_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write a safetensors file whose header has sorted keys."""
    # safetensors writes the header map in hash order, so the same mask gave different bytes on each
    # save; rewriting the header with sorted keys makes equal masks give equal files.
    save_file(tensors, path, metadata=metadata)
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(
        json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    header += b" " * (-len(header) % 8)
    Path(path).write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size :])


def write_authors_json(path: Union[str, os.PathLike], entries: dict[str, list]) -> None:
    """Write the authors'/SGLang JSON format (`model.layers.{i}.self_attn.{kind}_proj` -> rows), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(entries, handle)

    atomic_write(path, write)

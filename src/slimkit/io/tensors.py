"""The safetensors weights file of an artifact, read without trusting it.

The header (an 8-byte little-endian length, then JSON) is parsed with the bounded JSON
reader; every entry must have a known dtype, a shape, and data offsets that lie inside the
data area, match the shape's byte count and together cover the area exactly once. Tensors
are then read one at a time from the same descriptor the checksum was computed on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path

import torch

from slimkit.errors import ArtifactError
from slimkit.io.layout import FORMAT
from slimkit.io.manifest import MAX_HEADER_BYTES, parse_json, read_at

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: the order safetensors lays tensors out in: by dtype (this order), then by name
LAYOUT = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")


@dataclasses.dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    #: the metadata's other keys: a dropped alias -> the name stored (written by
    #: ``safetensors.torch.save_model`` in earlier versions; checked against the model)
    aliases: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(where: Path, fd: int) -> Header:
    """The checked tensor entries of the safetensors file open as ``fd``: in the layout
    safetensors writes (any other order means names were moved between tensors)."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise ArtifactError(f"{where}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", bytes(read_at(fd, 0, 8)))
    if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
        raise ArtifactError(f"{where}: header length {n} does not fit the file of {size} bytes")
    header = parse_json(bytes(read_at(fd, 8, n)), where)
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: the header is not a mapping")
    meta = header.pop("__metadata__", None)
    aliases = dict(meta) if isinstance(meta, dict) else {}
    if aliases.pop("format", None) != FORMAT:
        raise ArtifactError(f"{where}: header metadata {str(meta)[:80]} is not slimkit's")
    for alias, kept in aliases.items():
        if not isinstance(kept, str) or kept not in header or alias in header:
            raise ArtifactError(f"{where}: header metadata key {alias[:80]!r} is not an alias")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {name: _entry(where, name, e, data_start) for name, e in header.items()}
    _check_cover(where, entries, data_start, data_size)
    return Header(entries, aliases)


def _entry(where: Path, name: str, e: object, data_start: int) -> Entry:
    at = f"{where}: tensor {name[:80]!r}"
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise ArtifactError(f"{at}: needs dtype, shape and data_offsets")
    dtype = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dtype is None:
        raise ArtifactError(f"{at}: unknown dtype {str(e['dtype'])[:20]!r}")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_count(d) for d in shape)):
        raise ArtifactError(f"{at}: shape {str(shape)[:40]} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise ArtifactError(f"{at}: data_offsets {str(offsets)[:40]} are not two offsets")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != nbytes:
        raise ArtifactError(f"{at}: data_offsets {offsets} do not hold {nbytes} bytes")
    return Entry(dtype, tuple(shape), data_start + begin, nbytes)


def _count(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and 0 <= v < 1 << 48


def _check_cover(where: Path, entries: dict[str, Entry], start: int, size: int) -> None:
    """The tensors' byte ranges must follow each other from the data area's start to its
    end: no gap, no overlap, nothing outside."""
    at = start
    for name, e in sorted(
        entries.items(), key=lambda kv: (LAYOUT.index(NAMES[kv[1].dtype]), kv[0])
    ):
        if e.start != at:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} does not start where it should")
        at += e.nbytes
    if at != start + size:
        raise ArtifactError(f"{where}: the tensors cover {at - start} of {size} data bytes")


def read_tensor(fd: int, e: Entry) -> torch.Tensor:
    """The tensor ``e`` describes, read from ``fd`` (a new, writable CPU tensor)."""
    if e.nbytes == 0:
        return torch.zeros(e.shape, dtype=e.dtype)
    raw = read_at(fd, e.start, e.nbytes)
    return torch.frombuffer(raw, dtype=e.dtype).reshape(e.shape)

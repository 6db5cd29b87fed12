"""The safetensors file format: parse and validate a header, build one for a layout.

Imports only errors, dtypes and pagecache; reads or writes nothing itself except `read_header`,
which reads a file's first bytes (and `blocks`, the one loop that reads ranges to hash
them). Format: an 8-byte little-endian header length N,
N bytes of JSON (space-padded to a multiple of 8), then the data area; each tensor's
`data_offsets` are relative to the data area and must tile it without gaps.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .dtypes import itemsize, known_code
from .errors import InputError
from .pagecache import no_readahead

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
ALIGN = 8  # header padding, as the safetensors library writes it


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor as streamed: shape[0] rows for >= 2-D tensors, one row for 0-D and 1-D."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else math.prod(shape[1:]))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes lie."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """A parsed, validated safetensors header."""

    path: str
    data_start: int  # 8 + N
    file_size: int
    tensors: dict[str, TensorEntry]  # in data order
    metadata: dict[str, str]


def read_header(path: str) -> FileHeader:
    """Read and validate the header of a safetensors file.

    Args:
        path: the file.
    Returns:
        The header, with every tensor's absolute byte range.
    Raises:
        InputError: the file is truncated, the header is not valid JSON, a dtype is
        unknown, a shape does not match its byte range, ranges overlap or leave gaps,
        or the data runs past the end of the file. The message names the file.
    Example:
        >>> hdr = read_header("model-00001-of-00002.safetensors")
        >>> hdr.tensors["model.norm.weight"].shape
    """
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            no_readahead(f.fileno())  # the header only: its read-ahead would pull in the data (pagecache.py)
            head = f.read(8)
            if len(head) < 8:
                raise InputError(_bad(path, f"file is {file_size} bytes, too short for a header"))
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise InputError(_bad(path, f"its first 8 bytes are not a header length that fits the "
                                            f"{file_size}-byte file (is it a safetensors file at all?)"))
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    return parse_header(path, raw, file_size)


def parse_header(path: str, raw: bytes, file_size: int) -> FileHeader:
    """Validate header bytes `raw` (without the 8-byte length) of a file of `file_size` bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(_bad(path, f"header is not valid JSON ({e})")) from e
    except _DuplicateKey as e:
        raise InputError(_bad(path, f"the header names {e.args[0]!r} twice")) from None
    except RecursionError:
        raise InputError(_bad(path, "the header is nested too deeply to be a tensor table")) from None
    if not isinstance(obj, dict):
        raise InputError(_bad(path, "header is not a JSON object"))
    data_start = 8 + len(raw)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(_bad(path, "__metadata__ is not an object"))
    entries = [_entry(path, name, spec, data_start) for name, spec in obj.items()]
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in entries:
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
            raise InputError(_bad(path, f"tensor {t.name!r} at bytes {t.begin}..{t.end} {what}"))
        pos = t.end
    if pos > file_size:
        raise InputError(
            _bad(path, f"data ends at byte {pos} but the file has {file_size} bytes (truncated?)")
        )
    return FileHeader(path, data_start, file_size, {e.name: e for e in entries}, metadata)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refusing a key given twice (json would keep the last silently)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _entry(path: str, name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise InputError(_bad(path, f"entry {name!r} is not an object"))
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or not known_code(dtype):
        raise InputError(_bad(path, f"tensor {name!r} has unknown dtype {dtype!r}"))
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InputError(_bad(path, f"tensor {name!r} has invalid shape {shape!r}"))
    if not (
        isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
        and 0 <= offs[0] <= offs[1]
    ):
        raise InputError(_bad(path, f"tensor {name!r} has invalid data_offsets {offs!r}"))
    expect = math.prod(shape) * itemsize(dtype)
    if offs[1] - offs[0] != expect:
        raise InputError(
            _bad(path, f"tensor {name!r}: {dtype} {shape} needs {expect} bytes, "
                 f"data_offsets give {offs[1] - offs[0]}")
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def _bad(path: str, what: str) -> str:
    return f"{path}: not a valid safetensors file: {what}; re-download or regenerate this shard"


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Build the header bytes for tensors laid out back to back in the given order.

    Args:
        tensors: (name, dtype code, shape) in data order.
        metadata: the `__metadata__` map (string values), written first.
    Returns:
        (header bytes including the 8-byte length and padding, absolute (begin, end) per tensor)
    Example:
        >>> hdr, ranges = build_header([("w", "F32", (2, 3))], {"format": "pt"})
        >>> ranges
        [(len(hdr), len(hdr) + 24)]
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(sorted(metadata.items()))
    rel = 0
    rel_ranges = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [rel, rel + nbytes]}
        rel_ranges.append((rel, rel + nbytes))
        rel += nbytes
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % ALIGN)
    header = struct.pack("<Q", len(text)) + text
    return header, [(len(header) + b, len(header) + e) for b, e in rel_ranges]


HASH_BLOCK = 16 << 20  # bytes read at a time when hashing ranges of files


def blocks(read: Callable[[int, int], bytes], begin: int, nbytes: int) -> Iterator[bytes]:
    """Bytes [begin, begin + nbytes) through `read(offset, n)` (a pread), in blocks of at most
    HASH_BLOCK; stops early at the end of the file."""
    off, end = begin, begin + nbytes
    while off < end:
        block = read(off, min(HASH_BLOCK, end - off))
        if not block:
            return
        yield block
        off += len(block)


def preader(f: BinaryIO) -> Callable[[int, int], bytes]:
    """`read(offset, n)` on an open file, leaving its position alone."""
    fd = f.fileno()
    return lambda off, n: os.pread(fd, n, off)


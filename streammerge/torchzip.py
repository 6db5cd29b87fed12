"""The tensor table of a PyTorch `.bin` checkpoint, read without executing its pickle.

Imports errors, format, pagecache, dtypes. A checkpoint written by `torch.save` (torch >= 1.6) is a zip
archive: `PREFIX/data.pkl` pickles the state dict, and each tensor storage is a zip record
`PREFIX/data/KEY`, stored uncompressed. This module reads the pickle with an unpickler that
imports nothing: the few globals a state dict needs (`_rebuild_tensor_v2`, the typed storage
classes, `OrderedDict`) are answered with local stand-ins that only record what they are given,
and any other global is refused. Each tensor then becomes a `TensorEntry` whose byte range lies
inside its storage record, so the rows of a `.bin` tensor are read through the same memory map
as a safetensors tensor's, never the whole file.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from .dtypes import itemsize
from .errors import InputError
from .format import FileHeader, TensorEntry
from .pagecache import no_readahead

MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a state dict's pickle is kilobytes; refuse absurd ones

# torch's typed storage class names -> safetensors dtype codes
_STORAGES = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int  # elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: str


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object,
                    *_rest: object) -> _Tensor:
    """Stand-in for torch._utils._rebuild_tensor(_v2): records where the tensor's elements lie."""
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise pickle.UnpicklingError("a tensor whose storage is not a plain storage record")
    if not (isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(d, int) and d >= 0 for d in size) and all(isinstance(d, int) for d in stride)):
        raise pickle.UnpicklingError("a tensor with an invalid size or stride")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: object, *_rest: object) -> object:
    """Stand-in for torch._utils._rebuild_parameter: a Parameter is its data."""
    return data


_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(code) for name, code in _STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs, to stand-ins; imports nothing."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"an unexpected persistent record {str(pid)[:80]!r}")
        return _Storage(pid[1].dtype, pid[2])


class _Refused(pickle.UnpicklingError):
    """The pickle names a global that a state dict does not need."""


def read_torch_header(path: str) -> FileHeader:
    """The tensors of a PyTorch zip checkpoint, with the absolute byte range of each.

    Raises:
        InputError: the file is a legacy (non-zip) checkpoint, its pickle names anything but
            tensors and dicts (it would run code), a storage record is compressed, missing or too
            short, or a tensor is not stored contiguously. The message names the file.
    Example:
        >>> read_torch_header("pytorch_model-00001-of-00002.bin").tensors["lm_head.weight"].dtype
        'BF16'
    """
    try:
        file_size = os.path.getsize(path)
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: a PyTorch checkpoint in the legacy format (before torch 1.6, not a zip "
                             "archive), which streammerge does not read; load it once with an old torch and "
                             "save it again with torch.save, or convert it to safetensors")
        with open(path, "rb") as listing, open(path, "rb") as raw:
            no_readahead(listing.fileno())  # headers only: no read-ahead into the data (pagecache.py)
            no_readahead(raw.fileno())
            with zipfile.ZipFile(listing) as zf:
                return _parse(path, zf, raw, file_size)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error) as e:
        raise InputError(_bad(path, f"the zip archive is damaged ({e})")) from e


def _parse(path: str, zf: zipfile.ZipFile, raw: BinaryIO, file_size: int) -> FileHeader:
    records = {info.filename: info for info in zf.infolist()}
    pkl = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1] or \
          [n for n in records if n == "data.pkl"]
    if len(pkl) != 1:
        raise InputError(_bad(path, "no data.pkl record: this zip is not a torch.save checkpoint"))
    prefix = pkl[0][: -len("data.pkl")]
    order = records.get(prefix + "byteorder")
    if order is not None and zf.read(order).strip() not in (b"little", b""):
        raise InputError(_bad(path, "it was saved on a big-endian machine"))
    info = records[pkl[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise InputError(_bad(path, f"its data.pkl is {info.file_size} bytes, far more than a state dict needs"))
    obj = _unpickle(path, zf.read(info))
    tensors = _state_dict(path, obj)
    entries = []
    for name, t in tensors.items():
        rec = records.get(f"{prefix}data/{t.storage.key}")
        if rec is None:
            raise InputError(_bad(path, f"tensor {name!r}: storage record data/{t.storage.key} is missing"))
        entries.append(_entry(path, name, t, rec, _data_offset(path, raw, rec)))
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    data_start = min((e.begin for e in entries), default=file_size)
    return FileHeader(path, data_start, file_size, {e.name: e for e in entries}, {"format": "pt-zip"})


def _unpickle(path: str, data: bytes) -> object:
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise InputError(f"{path}: refused: its pickle asks for {e}, which a state dict of tensors never "
                         "needs; loading it could run code. Nothing from it was executed. Use a trusted "
                         "safetensors copy of this model") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RecursionError, MemoryError) as e:
        raise InputError(_bad(path, f"its data.pkl cannot be read as a state dict ({type(e).__name__}: "
                                    f"{str(e)[:200]})")) from None


def _state_dict(path: str, obj: object) -> dict[str, _Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint wrapping its weights (mergekit reads these too)
    if not isinstance(obj, dict):
        raise InputError(_bad(path, f"it holds a {type(obj).__name__}, not a state dict of tensors"))
    out = {}
    for name, value in obj.items():
        if isinstance(value, _Tensor) and isinstance(name, str):
            out[name] = value
    return out


def _data_offset(path: str, raw: BinaryIO, rec: zipfile.ZipInfo) -> int:
    if rec.compress_type != zipfile.ZIP_STORED:
        raise InputError(_bad(path, f"record {rec.filename} is compressed; streammerge reads tensors in place "
                                    "and needs them stored (as torch.save writes them)"))
    raw.seek(rec.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(_bad(path, f"record {rec.filename} has no local header at byte {rec.header_offset}"))
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return rec.header_offset + 30 + name_len + extra_len


def _entry(path: str, name: str, t: _Tensor, rec: zipfile.ZipInfo, data_offset: int) -> TensorEntry:
    size = itemsize(t.storage.dtype)
    numel = math.prod(t.size)
    expect, step = [], 1
    for d in reversed(t.size):
        expect.append(step)
        step *= d
    strides_ok = all(s == e for s, e, d in zip(t.stride, reversed(expect), t.size) if d > 1)
    if numel and (len(t.stride) != len(t.size) or not strides_ok):
        raise InputError(_bad(path, f"tensor {name!r} is stored as a non-contiguous view (size {list(t.size)}, "
                                    f"stride {list(t.stride)}), which cannot be read by rows; save it with "
                                    "contiguous tensors"))
    begin = data_offset + t.offset * size
    end = begin + numel * size
    if t.offset < 0 or end > data_offset + rec.file_size:
        raise InputError(_bad(path, f"tensor {name!r} needs bytes {begin}..{end}, past its storage record "
                                    f"{rec.filename} ({rec.file_size} bytes)"))
    return TensorEntry(name, t.storage.dtype, t.size, begin, end)


def _bad(path: str, what: str) -> str:
    return f"{path}: not a readable PyTorch checkpoint: {what}; re-download it or convert it to safetensors"

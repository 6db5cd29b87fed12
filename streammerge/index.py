"""The lazy tensor index of one model: shard headers now, row ranges read on demand later.

Imports errors, format, torchzip, pagecache, dtypes (and torch, numpy, xxhash). Shards are safetensors files or
PyTorch zip checkpoints (`.bin`, whose tensors are byte ranges inside stored records). Only
headers are read when an index is built; tensor data is read one row range at a time with pread,
straight into its destination or through a small per-thread staging buffer. pread rather than a
memory map: a shard truncated or replaced during the merge then gives a short read and a clear
error instead of a SIGBUS that kills the process, and no mapped pages linger in RSS.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass

import torch
import xxhash

from . import pagecache
from .dtypes import itemsize, torch_dtype
from .errors import InputError
from .format import FileHeader, TensorEntry, read_header, row_shape
from .torchzip import read_torch_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
STAGE_BYTES = 8 << 20  # raw bytes converted per slice when a read changes the dtype
# per reading thread: one staging buffer for every model's reads (budget.py counts two threads'),
# not one per model and thread (15 inputs held 15 of them)
_local = threading.local()


def _inside(name: str) -> bool:
    """A shard name that stays inside its model folder: relative, not climbing out, not the folder."""
    norm = os.path.normpath(name) if name else "."
    return not os.path.isabs(name) and "\0" not in name and norm != "." and norm.split(os.sep)[0] != ".."


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor lives, and how it is seen as rows."""

    shard: str  # absolute path
    entry: TensorEntry

    @functools.cached_property
    def rows(self) -> int:
        """Rows as streamed: shape[0] for >= 2-D tensors, one row for 0-D and 1-D (kept: a one-row
        block's read asks for it several times)."""
        return row_shape(self.entry.shape)[0]

    @functools.cached_property
    def cols(self) -> int:
        return row_shape(self.entry.shape)[1]

    @functools.cached_property
    def row_bytes(self) -> int:
        """Bytes of one row as stored."""
        return self.cols * itemsize(self.entry.dtype)

    def byte_range(self, row0: int, row1: int) -> tuple[int, int]:
        """Where rows [row0, row1) lie in the shard: absolute offsets [begin, end)."""
        return self.entry.begin + row0 * self.row_bytes, self.entry.begin + row1 * self.row_bytes


class ModelIndex:
    """Headers of every shard of one model folder; data read lazily, by rows.

    Example:
        >>> idx = ModelIndex("/models/base")
        >>> idx.read_rows("model.embed_tokens.weight", 0, 8).shape
        torch.Size([8, 4096])
    """

    def __init__(self, folder: str, label: str | None = None, files: tuple[str, ...] | None = None,
                 give_back: bool = False) -> None:
        """`give_back`: a merge's index: each shard's page cache is noted before it is read, and the
        pages its reads brought in are given back once read for the last time (`release`)."""
        self.folder = folder
        self.give_back = give_back
        self.files = files  # single files to look for instead of a model's (an adapter's)
        self.label = label or folder
        self.headers: dict[str, FileHeader] = {}
        self.tensors: dict[str, TensorRef] = {}
        self.listed_missing: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._cached: dict[str, pagecache.Residency] = {}  # per shard path: pages cached before any read
        self._load()

    def _load(self) -> None:
        index_name, weight_map, shards = self._find_shards()
        for shard in shards:
            if not _inside(shard):
                raise InputError(f"model {self.label}: {index_name} names the shard {shard!r}, outside the model "
                                 f"folder {self.folder}; every shard must lie inside it (a damaged or crafted "
                                 "index: re-download the model)")
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise InputError(f"model {self.label}: shard {path} is listed in {index_name} but missing; "
                                 "re-download the model")
            self._snapshot(path)
            hdr = read_torch_header(path) if shard.endswith(".bin") else read_header(path)
            self.headers[shard] = hdr
            for name, entry in hdr.tensors.items():
                if weight_map is None or weight_map.get(name) == shard:
                    self.tensors[name] = TensorRef(path, entry)
        # tensors the index lists but its shard lacks: the planner names them if a merge needs them
        self.listed_missing = {n: s for n, s in (weight_map or {}).items() if n not in self.tensors}

    def _snapshot(self, path: str) -> None:
        """Which of the shard's pages the page cache holds before this index reads any, the header
        included (pagecache.py)."""
        if not self.give_back or not pagecache.honest(path):
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # the header read that follows names the problem
        try:
            size = os.fstat(fd).st_size
            bits = pagecache.resident(fd, size)
        finally:
            os.close(fd)
        if bits is not None:
            pages = pagecache.outer_pages(0, size)[1]
            self._cached[path] = pagecache.Residency(bits, pages, pagecache.willneed_bytes(path))

    def _find_shards(self) -> tuple[str, dict[str, str] | None, list[str]]:
        """(index file, weight map or None, shard files): safetensors first, then PyTorch .bin
        (mergekit's order, SEMANTICS §4.1), so a folder holding both is read as safetensors."""
        if self.files is not None:
            found = [f for f in self.files if os.path.isfile(os.path.join(self.folder, f))]
            if not found:
                raise InputError(f"{self.label}: {self.folder} has no {' or '.join(self.files)}")
            return found[0], None, [found[0]]
        for index_name, single in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_SINGLE_FILE)):
            index_path = os.path.join(self.folder, index_name)
            if os.path.isfile(index_path):
                weight_map = self._weight_map(index_path)
                return index_name, weight_map, sorted(set(weight_map.values()))
            if os.path.isfile(os.path.join(self.folder, single)):
                return single, None, [single]
        raise InputError(f"model {self.label}: {self.folder} has no {SINGLE_FILE}, {INDEX_FILE}, "
                         f"{BIN_SINGLE_FILE} or {BIN_INDEX_FILE}; is it a model folder?")

    def _weight_map(self, path: str) -> dict[str, str]:
        try:
            with open(path) as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("weight_map is not a map of names to files")
            return {str(k): v for k, v in wm.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"model {self.label}: {path} is not a valid shard index ({e}); "
                             "re-download the model") from e

    def identity(self) -> dict[str, object]:
        """What identifies this input: per shard its name, size, mtime and header hash, and in a
        Hugging Face cache the blob it links to (named by the file's sha256 or git hash)."""
        shards = {}
        for name, hdr in sorted(self.headers.items()):
            st = os.stat(hdr.path)
            with open(hdr.path, "rb") as f:
                pagecache.no_readahead(f.fileno())
                head = f.read(hdr.data_start)
            shards[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                            "header_xxh3_128": xxhash.xxh3_128_hexdigest(head)}
            real = os.path.realpath(hdr.path)
            if os.path.basename(os.path.dirname(real)) == "blobs":  # a Hugging Face cache names blobs by content
                shards[name]["blob"] = os.path.basename(real)
        return {"folder": self.folder, "shards": shards}

    def identity_hash(self) -> str:
        """xxh3-128 of identity(): what a plan fingerprints this input by, and a run checks again."""
        return xxhash.xxh3_128_hexdigest(json.dumps(self.identity(), sort_keys=True).encode())

    def read_rows(self, name: str, row0: int, row1: int, out: torch.Tensor | None = None,
                  hasher: xxhash.xxh3_128 | None = None, stage: torch.Tensor | None = None,
                  via: torch.dtype | None = None) -> torch.Tensor:
        """Rows [row0, row1) of tensor `name` as (rows, cols).

        The bytes are read with pread, never touched through a memory map: a shard truncated or
        replaced during the merge then gives a short read and a clear InputError, not a SIGBUS that
        kills the process.

        Args:
            out: if given, the rows are converted into it (read straight into it when it has the
                tensor's dtype, else through a reused staging buffer); otherwise a copy in the
                tensor's own dtype is returned.
            hasher: fed the rows' raw bytes.
            stage: the staging buffer to use (uint8; slices fill it, or take one row where a row
                is wider); default: this thread's own, of STAGE_BYTES.
            via: with `out`, a dtype each slice is cast to on its way into `out` (the config's
                dtype: values rounded to it, then widened to the block's). A slice and its cast
                together take at most the staging buffer's bytes: nothing the size of the rows read.
        """
        ref = self.tensors[name]
        dtype = torch_dtype(ref.entry.dtype)
        shape = (row1 - row0, ref.cols)
        via = None if via == dtype or (out is not None and via == out.dtype) else via  # copy_ rounds to out's
        if out is None or (out.dtype == dtype and out.is_contiguous() and via is None):
            assert via is None or out is not None, "via needs out"
            target = torch.empty(shape, dtype=dtype) if out is None else out
            self.pread_rows(name, row0, row1, target, hasher)
            return target
        width = ref.row_bytes
        cast = ref.cols * via.itemsize if via is not None else 0  # a slice's cast, beside its staged bytes
        room = stage.numel() if stage is not None else STAGE_BYTES
        step = max(1, room // max(1, width + cast))  # rows per slice through the staging buffer
        need = min(row1 - row0, step) * width
        buf = self._staging(need) if stage is None or stage.numel() < need else stage[:need]
        for r in range(row0, row1, step):
            e = min(row1, r + step)
            part = buf[:(e - r) * width]
            self.pread_rows(name, r, e, part, hasher)
            rows = part.view(dtype).reshape(e - r, ref.cols)
            out[r - row0:e - row0].copy_(rows if via is None else rows.to(via))
        return out

    def _staging(self, nbytes: int) -> torch.Tensor:
        """This thread's byte buffer, reused across reads of every model (a fresh allocation per
        block costs page faults); at most STAGE_BYTES, or one row when a row is wider."""
        buf = getattr(_local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = _local.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def pread_rows(self, name: str, row0: int, row1: int, out: torch.Tensor,
                   hasher: xxhash.xxh3_128 | None = None) -> None:
        """The raw bytes of rows [row0, row1) of tensor `name` into `out` (a contiguous CPU tensor of
        exactly that many bytes), by pread: no mapping, no page faults, no conversion."""
        ref = self.tensors[name]
        begin, end = ref.byte_range(row0, row1)
        nbytes = end - begin
        if out.numel() * out.element_size() != nbytes:
            raise ValueError(f"internal error: {nbytes} bytes of {name!r} into a buffer of another size")
        with self._lock:
            fd = self._fds.get(ref.shard)
            if fd is None:
                fd = self._fds[ref.shard] = os.open(ref.shard, os.O_RDONLY)
                if ref.shard in self._cached and not pagecache.kernel_readahead():
                    pagecache.no_readahead(fd)  # pages read are given back: read no others
        view = memoryview(out.view(torch.uint8).numpy()) if nbytes else memoryview(b"")  # type: ignore[arg-type]
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise InputError(f"{ref.shard}: cannot read {name!r} bytes {begin}..{begin + nbytes}; the file "
                                 "changed or was truncated during the merge")
            done += n
        if hasher is not None:
            hasher.update(view)

    def release(self, name: str, row0: int = 0, row1: int | None = None) -> None:
        """The merge reads rows [row0, row1) of `name` no more (no rows given: the whole tensor, for
        good): the pages inside them that the page cache did not hold before are given back
        (pagecache.py)."""
        ref = self.tensors[name]
        res = self._cached.get(ref.shard)
        with self._lock:
            fd = self._fds.get(ref.shard)
        if res is None or fd is None:
            return
        if row1 is None:
            res.finish(fd, ref.entry.begin, ref.entry.end)
        else:
            res.release(fd, *ref.byte_range(row0, row1))

    def prefetch(self, name: str, row0: int, row1: int) -> None:
        """The merge reads rows [row0, row1) of `name` next: where read-ahead is off for its shard (its
        pages are given back), the kernel is asked to start reading them now."""
        ref = self.tensors[name]
        with self._lock:
            fd = self._fds.get(ref.shard)
        res = self._cached.get(ref.shard)
        if fd is not None and res is not None:
            res.prefetch(fd, *ref.byte_range(row0, row1))

    def close(self) -> None:
        """Close every shard."""
        with self._lock:
            for shard, fd in self._fds.items():
                if shard in self._cached:
                    self._cached[shard].sweep(fd)
                os.close(fd)
            self._fds.clear()

"""Input pages a merge brings into the page cache, given back once it has read them for the last time.

Imports nothing of streammerge (numpy, ctypes). The kernel charges a page-cache page to the memory
cgroup of the process that read it. A merge reads each input byte once per pass and then never
again, yet those clean pages stay charged: inside a cgroup as tight as the merge's own budget (a
container, or `memcap` at 512 MiB) every further read makes the kernel reclaim, read-ahead pages
are evicted before they are used, and the merge spends a third of its time in the kernel (the
14-model DARE-TIES at 512 MiB, cold: 39-41 s in a 512 MiB cgroup against 22-24 s in a 2 GiB one).

So, for a merge's inputs (`ModelIndex(give_back=True)`):
- each shard's residency is noted (one bit per page, mincore over a read-only mapping that is
  never touched) before anything of it is read;
- once the merge has read a byte range for the last time, the pages inside it that were *not*
  cached before are dropped (posix_fadvise DONTNEED). What a user had cached stays cached: a merge
  of warm inputs drops nothing;
- where the memory cgroup leaves no room beside the budget for the kernel's read-ahead
  (kernel_readahead), it is off for these files (it reads megabytes past each read, into tensors
  already finished, and charges them before they are needed), and the reader asks instead for
  the pages of exactly the rows it reads next that were not cached (WILLNEED), while a block
  computes. (A page cached at the start and evicted since is read when the merge reaches it.)
  Elsewhere the kernel reads ahead as usual, and at the end every page of a shard that was not
  cached before is given back, finished or read ahead.
Only clean pages of input files are dropped; nothing is written.

Linux only; elsewhere, or where the kernel would not report another user's file honestly (mincore
reports page-cache residency only to a file's owner or a process that could write it), nothing is
noted and nothing dropped, and the kernel reads ahead as usual.

Its libc also gives the heap's freed memory back between a pipeline's stages (`trim_heap`).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import sys
import threading

import numpy as np

PAGE = mmap.PAGESIZE
_CHUNK_PAGES = (1 << 30) // PAGE  # pages mapped per mincore call (a multiple of 8: bits pack whole)
# past a finished tensor, how far to look for its finished neighbours' pages a read-ahead brought
# back: above the largest read-ahead window Linux systems use (read_ahead_kb; 128 KiB to 16 MiB)
SWEEP_BYTES = 32 << 20
_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


_libc = _load_libc()


def trim_heap() -> None:
    """Give the heap memory the process freed back to the kernel (glibc's malloc_trim(0)): glibc
    keeps freed blocks for reuse, so a pipeline's next stage measured them as memory the process
    holds, and asked for a budget 50 MiB larger than the first (a 262,144-column linear merge's
    blocks). Nothing where there is no glibc."""
    trim = getattr(_libc, "malloc_trim", None) if _libc is not None else None
    if trim is not None:
        trim(0)


def honest(path: str) -> bool:
    """Whether mincore reports `path`'s page cache as it is: the kernel tells the file's owner, a
    process that may write it, or root; anyone else sees only pages mapped in its own tables."""
    if _libc is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    euid = os.geteuid()
    return euid == 0 or st.st_uid == euid or os.access(path, os.W_OK)


def resident(fd: int, size: int) -> np.ndarray | None:
    """The file's page-cache residency, one bit per page (numpy.packbits order: page 0 is the first
    byte's high bit); None where it cannot be read. Maps the file read-only, a chunk at a time, and
    touches none of it, so nothing is read in."""
    if _libc is None:
        return None
    pages = -(-size // PAGE)
    parts = []
    for p0 in range(0, pages, _CHUNK_PAGES):
        n = min(_CHUNK_PAGES, pages - p0)
        length = min(size - p0 * PAGE, n * PAGE)
        addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, p0 * PAGE)
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            vec = bytearray(n)
            if _libc.mincore(addr, length, (ctypes.c_ubyte * n).from_buffer(vec)) != 0:
                return None
        finally:
            _libc.munmap(addr, length)
        parts.append(np.packbits(np.frombuffer(vec, dtype=np.uint8) & 1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


# Where the merge's memory cgroup (or the machine) leaves room beside what the merge is expected to
# hold (at most its budget) for the kernel's read-ahead, the kernel reads ahead as usual and the
# reader asks for nothing. Measured on the medium set with the inputs not cached (2 cores,
# --max-memory 512MiB, merge-loop seconds, 2 runs each), against read-ahead off and WILLNEED asked:
# the 14-model DARE-TIES 5.4-5.5 s against 6.0-6.3 without a cgroup, 5.5 against 6.5-6.6 in a 2 GiB
# cgroup, 5.7-6.1 against 6.5 in 1 GiB, 6.1-6.3 against 7.0 in 768 MiB; the 3-model linear 0.80
# against 1.02-1.06 s (WILLNEED's page-cache work alone cost the reading thread 0.6 s of the
# DARE-TIES). In a cgroup as tight as the budget (512 MiB) the kernel's read-ahead lost where its
# windows did not fit beside the merge, 8.2-8.3 s against 6.8 (15 inputs, 240 MiB of windows): the
# pages it read ahead were reclaimed before they were used; and won where they did, the 3-model
# linear merge (48 MiB of windows beside an expected 428 MiB) 0.74-0.83 s against 0.94-1.06. Pages
# the merge brought in are given back either way.
_kernel_readahead = {"on": False}


def kernel_readahead(on: bool | None = None) -> bool:
    """Whether the kernel reads ahead for the inputs whose pages are given back (set per run by the
    executor: `on`); off, reads bring in only their pages and the reader asks for the next rows'."""
    if on is not None:
        _kernel_readahead["on"] = on
    return _kernel_readahead["on"]


def readahead_bytes(path: str, default: int = 8 << 20) -> int:
    """The kernel's read-ahead window for the file at `path`: its device's read_ahead_kb (the
    partition's disk, a network file system's own); `default` where Linux's /sys does not say."""
    got = _device_kb(path, ("/sys/class/bdi/{}/read_ahead_kb", "/sys/dev/block/{}/queue/read_ahead_kb",
                            "/sys/dev/block/{}/../queue/read_ahead_kb"))
    return default if got is None else got


# The least a WILLNEED reads of what it asks, where /sys does not say: the usual read_ahead_kb.
WILLNEED_DEFAULT = 128 << 10


def willneed_bytes(path: str) -> int:
    """The most one POSIX_FADV_WILLNEED reads for the file at `path`: Linux reads at most the larger
    of its device's read-ahead window and largest request (max_sectors_kb) of the range it is
    asked for, and drops the rest (mm/readahead.c, force_page_cache_ra: 8 MiB of every range here,
    whatever its length; 1.25 MiB on a disk with the usual 128 KiB window and 1280 KiB requests).
    WILLNEED_DEFAULT where /sys says neither."""
    window = readahead_bytes(path, 0)
    request = _device_kb(path, ("/sys/dev/block/{}/queue/max_sectors_kb", "/sys/dev/block/{}/../queue/max_sectors_kb"))
    return max(window, request or 0) or WILLNEED_DEFAULT


def _device_kb(path: str, places: tuple[str, ...]) -> int | None:
    """Bytes from the first of `places` (sysfs files giving KiB, "{}" the device of `path`'s file
    system as major:minor) that can be read; None where none can."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    node = f"{os.major(dev)}:{os.minor(dev)}"
    for where in places:
        try:
            with open(where.format(node)) as f:
                return int(f.read()) << 10
        except (OSError, ValueError):
            continue
    return None


def no_readahead(fd: int) -> None:
    """Reads through `fd` bring in only the pages they ask for: the kernel reads ahead no further
    for this open file, and leaves no read-ahead mark either (a later read through another file
    that reaches a marked page reads megabytes past it, into tensors already given back)."""
    _advise(fd, 0, 0, "POSIX_FADV_RANDOM")


def _advise(fd: int, offset: int, length: int, advice: str) -> None:
    """posix_fadvise where there is one; advice is only advice, so a file system refusing it is no error."""
    if hasattr(os, advice):
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, advice))
        except OSError:
            pass


def inner_pages(begin: int, end: int) -> tuple[int, int]:
    """Pages wholly inside bytes [begin, end): [first, last) (empty when first >= last). A page the
    range only shares with a neighbour stays: the neighbour may still be read."""
    return -(-begin // PAGE), end // PAGE


def outer_pages(begin: int, end: int) -> tuple[int, int]:
    """Pages holding any of bytes [begin, end): [first, last) (empty when the range is)."""
    return (begin // PAGE, -(-end // PAGE)) if end > begin else (0, 0)


def _all_set(bits: np.ndarray, pages: int) -> bool:
    """Whether the first `pages` bits of `bits` (numpy.packbits order) are all set."""
    whole, rest = divmod(pages, 8)
    if len(bits) * 8 < pages or not bool(np.all(bits[:whole] == 0xFF)):
        return False
    return rest == 0 or (int(bits[whole]) >> (8 - rest)) == (1 << rest) - 1


def absent_runs(bits: np.ndarray, p0: int, p1: int) -> list[tuple[int, int]]:
    """Runs [a, b) of pages in [p0, p1) whose bit is clear (not cached when `bits` was taken), in
    order; pages past the bits count as absent."""
    if p1 <= p0:
        return []
    have = len(bits) * 8
    seen = np.zeros(p1 - p0, dtype=np.uint8)
    if p0 < have:
        hi = min(p1, have)
        seen[:hi - p0] = np.unpackbits(bits[p0 // 8:-(-hi // 8)])[p0 % 8:p0 % 8 + hi - p0]
    edges = np.flatnonzero(np.diff(np.concatenate(([1], seen, [1])).astype(np.int8)))
    return [(p0 + int(a), p0 + int(b)) for a, b in zip(edges[0::2], edges[1::2])]


class Residency:
    """One shard's pages as the merge found them, and the byte ranges it has finished reading.

    Example:
        >>> res = Residency(resident(fd, size))
        >>> res.release(fd, begin, end)   # rows read for the last time
        >>> res.finish(fd, begin, end)    # a whole tensor done
    """

    def __init__(self, bits: np.ndarray, pages: int | None = None, asked: int = WILLNEED_DEFAULT) -> None:
        """bits: from `resident`; pages: the file's page count, when known (every page cached: the
        usual warm merge, where nothing is asked of the kernel and no page looked up again); asked:
        the most one request to read ahead reads (willneed_bytes)."""
        self.bits = bits
        self.pages = pages
        self.asked = asked
        # a finished range's pages looked up, for nothing, took 0.07 of the reading thread's 0.57 CPU
        # seconds in a warm 3-model linear merge, and 0.03 of the computing thread's 0.95
        self.warm = pages is not None and _all_set(bits, pages)
        self._done: list[tuple[int, int]] = []  # finished byte ranges: sorted, disjoint, not touching
        self._lock = threading.Lock()

    def release(self, fd: int, begin: int, end: int) -> None:
        """Bytes [begin, end) are read no more: give back the pages wholly inside that were not cached."""
        if self.warm:
            return
        drop(fd, absent_runs(self.bits, *inner_pages(begin, end)))

    def finish(self, fd: int, begin: int, end: int) -> None:
        """A whole tensor's bytes [begin, end) are read no more. Its pages, and those of finished
        ranges up to SWEEP_BYTES past it, are given back: a page two finished tensors share is
        inside their union, and a read-ahead the kernel started from another file's mark (read-ahead
        off for ours does not stop it) may have brought finished pages in again."""
        if self.warm:
            return
        with self._lock:
            k = bisect.bisect_left(self._done, (begin, end))
            lo, hi = begin, end
            while k > 0 and self._done[k - 1][1] >= lo:  # merge with what it touches
                k -= 1
                lo = min(lo, self._done[k][0])
                hi = max(hi, self._done.pop(k)[1])
            while k < len(self._done) and self._done[k][0] <= hi:
                hi = max(hi, self._done.pop(k)[1])
            self._done.insert(k, (lo, hi))
            window = [(max(a, begin), min(b, end + SWEEP_BYTES)) for a, b in self._done[k:]
                      if a < end + SWEEP_BYTES]
        for a, b in window:
            self.release(fd, a, b)

    def prefetch(self, fd: int, begin: int, end: int) -> None:
        """Bytes [begin, end) are read next: ask the kernel to start reading the pages among them that
        were not cached (prefetch), where its own read-ahead is off (kernel_readahead). Asking for
        cached ones too cost the reading thread a page-cache walk per call: 17% of its samples in a
        warm 15-model merge (py-spy), for pages already there."""
        if self.warm or kernel_readahead():
            return
        for a, b in absent_runs(self.bits, *outer_pages(begin, end)):
            prefetch(fd, a * PAGE, b * PAGE, self.asked)

    def sweep(self, fd: int) -> None:
        """The merge is over: give back every page of the file that was not cached before it (the
        kernel's read-ahead may have brought in pages of no finished range: the file's last ones,
        read ahead from another tensor's rows after their own were given back); where the file's
        length is not known, every finished range's."""
        if self.warm:
            return
        if self.pages is not None:
            drop(fd, absent_runs(self.bits, 0, self.pages))
            return
        with self._lock:
            done = list(self._done)
        for a, b in done:
            self.release(fd, a, b)


def prefetch(fd: int, begin: int, end: int, piece: int = WILLNEED_DEFAULT) -> None:
    """Ask the kernel to start reading bytes [begin, end) now, in the background: the read-ahead
    that no_readahead turned off, for exactly the rows the merge reads next; asked in pieces of at
    most `piece` bytes (willneed_bytes: one request for the whole range reads only its first)."""
    piece = max(PAGE, piece)
    for at in range(begin, end, piece):
        _advise(fd, at, min(end, at + piece) - at, "POSIX_FADV_WILLNEED")


def drop(fd: int, runs: list[tuple[int, int]]) -> None:
    """Give the pages of `runs` back to the kernel (clean input pages: it reads them again if asked)."""
    for a, b in runs:
        _advise(fd, a * PAGE, (b - a) * PAGE, "POSIX_FADV_DONTNEED")

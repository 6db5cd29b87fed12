"""Input pages a merge brought into the page cache are given back; pages a user had cached stay.

The page arithmetic is checked against references written from its definition (hypothesis); the
kernel side on real files: a cold merge leaves (almost) nothing of its inputs cached, and no page
given back was cached before the merge.
"""

from __future__ import annotations

import glob
import os
import time

import make_models
import numpy as np
import pytest
from helpers import ROOMY
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import executor, pagecache
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.format import read_header
from streammerge.options import RunOptions
from streammerge.planner import make_plan

PAGE = pagecache.PAGE


def ref_absent_runs(cached: list[bool], p0: int, p1: int) -> list[tuple[int, int]]:
    """Maximal runs of pages in [p0, p1) not cached; pages past the list are not cached."""
    runs: list[tuple[int, int]] = []
    for p in range(p0, p1):
        if p < len(cached) and cached[p]:
            continue
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


@settings(max_examples=300, deadline=None)
@given(cached=st.lists(st.booleans(), max_size=80), p0=st.integers(0, 100), n=st.integers(-3, 100))
def test_absent_runs_are_the_uncached_pages_in_order(cached: list[bool], p0: int, n: int) -> None:
    bits = np.packbits(np.array(cached, dtype=np.uint8)) if cached else np.zeros(0, dtype=np.uint8)
    assert pagecache.absent_runs(bits, p0, p0 + n) == ref_absent_runs(cached, p0, p0 + n)


@given(begin=st.integers(0, 10 * PAGE), length=st.integers(0, 10 * PAGE))
def test_inner_pages_are_exactly_the_pages_inside_the_range(begin: int, length: int) -> None:
    first, last = pagecache.inner_pages(begin, begin + length)
    inside = [p for p in range(0, 21) if begin <= p * PAGE and (p + 1) * PAGE <= begin + length]
    assert list(range(first, last)) == inside


@given(cached=st.lists(st.booleans(), max_size=40), begin=st.integers(0, 45 * PAGE), length=st.integers(0, 6 * PAGE))
def test_prefetch_asks_for_exactly_the_uncached_pages_of_the_range(cached: list[bool], begin: int,
                                                                    length: int) -> None:
    """Every page holding a byte of the range and not cached is asked for once; no cached page is
    (where the kernel's read-ahead is off; a merge run before in this process may have set it on)."""
    bits = np.packbits(np.array(cached, dtype=np.uint8)) if cached else np.zeros(0, dtype=np.uint8)
    asked: list[tuple[int, int]] = []
    real, was = pagecache.prefetch, pagecache.kernel_readahead()
    pagecache.prefetch = lambda fd, a, b, piece=0: asked.append((a, b))  # type: ignore[assignment]
    pagecache.kernel_readahead(False)
    try:
        pagecache.Residency(bits).prefetch(-1, begin, begin + length)
    finally:
        pagecache.prefetch = real  # type: ignore[assignment]
        pagecache.kernel_readahead(was)
    pages = [p for a, b in asked for p in range(a // PAGE, b // PAGE)]
    assert all(a % PAGE == 0 and b % PAGE == 0 and a < b for a, b in asked)
    held = {(begin + i) // PAGE for i in range(0, length, 64)} | ({(begin + length - 1) // PAGE} if length else set())
    want = sorted(p for p in held if not (p < len(cached) and cached[p]))
    assert pages == want


@given(begin=st.integers(0, 1 << 40), length=st.integers(-PAGE, 64 << 20), piece=st.integers(0, 16 << 20))
def test_a_prefetch_is_asked_in_pieces_the_kernel_reads_whole(begin: int, length: int, piece: int) -> None:
    """Linux reads at most willneed_bytes of what one WILLNEED asks for: a range is asked for in
    consecutive pieces of at most `piece` bytes (a page at least) that cover it exactly."""
    asked: list[tuple[int, int, str]] = []
    real = pagecache._advise
    pagecache._advise = lambda fd, offset, n, advice: asked.append((offset, n, advice))  # type: ignore[assignment]
    try:
        pagecache.prefetch(-1, begin, begin + length, piece)
    finally:
        pagecache._advise = real  # type: ignore[assignment]
    assert all(advice == "POSIX_FADV_WILLNEED" and 0 < n <= max(PAGE, piece) for _, n, advice in asked)
    ends = [begin] + [offset + n for offset, n, _ in asked]
    assert [offset for offset, _, _ in asked] == ends[:-1]
    assert ends[-1] == max(begin, begin + length)


@given(ranges=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), min_size=1, max_size=12))
def test_finished_ranges_and_what_finish_gives_back(ranges: list[tuple[int, int]]) -> None:
    """Finished ranges stay sorted, disjoint and apart; a finish gives back only uncached pages, all
    of them inside finished ranges, and the sweep every uncached page wholly inside their union."""
    cached = [p % 3 == 0 for p in range(80)]
    res = pagecache.Residency(np.packbits(np.array(cached, dtype=np.uint8)))
    dropped: list[tuple[int, int]] = []
    real = pagecache.drop
    pagecache.drop = lambda fd, runs: dropped.extend(runs)  # type: ignore[assignment]
    try:
        done: set[int] = set()  # bytes finished, in units of 1/4 page
        for start, length in ranges:
            b0, b1 = start * PAGE // 4, (start + length) * PAGE // 4
            res.finish(-1, b0, b1)
            done |= set(range(start, start + length))
        spans = res._done
        assert spans == sorted(spans) and all(a < b for a, b in spans)
        assert all(spans[k][1] < spans[k + 1][0] for k in range(len(spans) - 1))
        assert {q for a, b in spans for q in range(a * 4 // PAGE, -(-b * 4 // PAGE))} == done
        for a, b in dropped:
            for p in range(a, b):
                assert not cached[p]
                assert all(q in done for q in range(4 * p, 4 * p + 4))  # wholly finished
        dropped.clear()
        res.sweep(-1)
        want = {p for p in range(80) if not cached[p] and all(q in done for q in range(4 * p, 4 * p + 4))}
        assert {p for a, b in dropped for p in range(a, b)} == want
    finally:
        pagecache.drop = real  # type: ignore[assignment]


@settings(max_examples=300, deadline=None)
@given(cached=st.lists(st.booleans(), max_size=40), pages=st.integers(0, 45), ops=st.lists(
    st.tuples(st.sampled_from(["prefetch", "release", "finish"]), st.integers(0, 45 * PAGE), st.integers(0, 6 * PAGE)),
    max_size=8))
def test_a_file_cached_whole_asks_nothing_of_the_kernel(cached: list[bool], pages: int,
                                                         ops: list[tuple[str, int, int]]) -> None:
    """A file of `pages` pages whose every page was cached (Residency.warm) has nothing to give
    back or prefetch; one that misses any page of its own (pages past the bits count as missing)
    is not warm. Bits past the file's pages (packbits' padding, a longer list) do not count."""
    bits = np.packbits(np.array(cached, dtype=np.uint8)) if cached else np.zeros(0, dtype=np.uint8)
    res = pagecache.Residency(bits, pages)
    assert res.warm == (len(cached) >= pages and all(cached[:pages]))
    asked: list[tuple[int, int]] = []
    real, was = (pagecache.prefetch, pagecache.drop), pagecache.kernel_readahead()
    pagecache.prefetch = lambda fd, a, b, piece=0: asked.append((a, b))  # type: ignore[assignment]
    pagecache.drop = lambda fd, runs: asked.extend(runs)  # type: ignore[assignment]
    pagecache.kernel_readahead(False)  # the reader asking for pages: the case that asks most
    try:
        for op, begin, length in ops:
            getattr(res, op)(-1, begin, begin + length)
        res.sweep(-1)
    finally:
        pagecache.prefetch, pagecache.drop = real  # type: ignore[assignment]
        pagecache.kernel_readahead(was)
    if res.warm:
        assert asked == []


def _cold(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident(path: str) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        bits = pagecache.resident(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert bits is not None
    return np.unpackbits(bits)[:-(-os.path.getsize(path) // PAGE)].astype(bool)


@pytest.fixture(scope="module")
def mb_set(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three ~9 MB models in 4 MB shards, on a file system whose page cache can be dropped."""
    if not pagecache.honest(str(tmp_path_factory.getbasetemp())) or not hasattr(os, "posix_fadvise"):
        pytest.skip("mincore and posix_fadvise: Linux only")
    root = tmp_path_factory.mktemp("pagecache")
    probe = root / "probe"
    probe.write_bytes(b"\1" * (1 << 20))
    _cold(str(probe))
    if _resident(str(probe)).any():
        pytest.skip(f"{root}'s file system keeps its pages (tmpfs?): nothing to give back")
    folders = [str(root / n) for n in ("base", "ft1", "ft2")]
    make_models.write_set(folders, make_models.Shape(256, 896, 4, 4, 2, 2048), seed=3, shard_bytes=4_000_000)
    return folders


def test_the_kernel_reads_every_page_a_prefetch_asks_for(tmp_path) -> None:
    """Three of the device's WILLNEED reads and a bit of a file, not cached, asked for at once: every
    page is then in the page cache (in one request, only the first willneed_bytes were)."""
    if not pagecache.honest(str(tmp_path)) or not hasattr(os, "posix_fadvise"):
        pytest.skip("mincore and posix_fadvise: Linux only")
    path = str(tmp_path / "shard")
    piece = pagecache.willneed_bytes(str(tmp_path))
    size = 3 * piece + 5 * PAGE + 7
    with open(path, "wb") as f:
        f.write(b"\1" * size)
    _cold(path)
    if _resident(path).any():
        pytest.skip(f"{tmp_path}'s file system keeps its pages (tmpfs?): nothing to ask for")
    assert pagecache.willneed_bytes(path) == piece
    fd = os.open(path, os.O_RDONLY)
    was = pagecache.kernel_readahead()
    pagecache.kernel_readahead(False)
    try:
        bits = pagecache.resident(fd, size)
        assert bits is not None
        pagecache.Residency(bits, -(-size // PAGE), piece).prefetch(fd, 0, size)
        deadline = time.monotonic() + 10  # pages being read show in mincore once their read is done
        while not _resident(path).all() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _resident(path).all()
    finally:
        pagecache.kernel_readahead(was)
        os.close(fd)
        _cold(path)


def _ties(folders: list[str]):
    text = (f"merge_method: ties\nbase_model: {folders[0]}\nmodels:\n"
            + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.6}}\n" for f in folders[1:])
            + "dtype: bfloat16\n")
    return make_plan(parse_config(text), 64 << 20)


def _shards(folders: list[str]) -> list[str]:
    return sorted(p for f in folders for p in glob.glob(os.path.join(f, "*.safetensors")))


@pytest.fixture(params=[False, True], ids=["reader-asks", "kernel-reads-ahead"])
def readahead(request, monkeypatch) -> bool:
    """Both ways of reading inputs the merge gives back: the kernel's read-ahead off and the reader
    asking for the next rows (a memory cgroup as tight as the budget), or the kernel's own."""
    monkeypatch.setattr(executor, "readahead_fits", lambda plan, max_memory: request.param)
    return request.param


def test_a_cold_merge_gives_its_inputs_pages_back(mb_set: list[str], tmp_path, readahead: bool) -> None:
    shards = _shards(mb_set)
    for p in shards:
        _cold(p)
    Executor(_ties(mb_set), str(tmp_path / "out"), RunOptions(max_memory=ROOMY, chunk_bytes=1 << 18)).run()
    for p in shards:
        left = _resident(p)
        header = -(-read_header(p).data_start // PAGE) + 1  # the header's pages and the first data page
        assert left.sum() <= header, f"{p}: {left.sum()} of {len(left)} pages still cached"


def test_pages_cached_before_the_merge_are_never_given_back(mb_set: list[str], tmp_path, monkeypatch,
                                                           readahead: bool) -> None:
    shards = _shards(mb_set)
    for k, p in enumerate(shards):  # every other shard cold; the rest cached in alternate 64 KiB stripes
        _cold(p)
        if k % 2:
            with open(p, "rb") as f:
                for off in range(0, os.path.getsize(p), 128 << 10):
                    f.seek(off)
                    f.read(64 << 10)
    before = {os.path.realpath(p): _resident(p) for p in shards}
    given_back: list[tuple[str, int, int]] = []
    real = pagecache.drop

    def drop(fd: int, runs: list[tuple[int, int]]) -> None:
        path = os.path.realpath(f"/proc/self/fd/{fd}")
        given_back.extend((path, a, b) for a, b in runs)
        real(fd, runs)

    monkeypatch.setattr(pagecache, "drop", drop)
    Executor(_ties(mb_set), str(tmp_path / "out"), RunOptions(max_memory=ROOMY, chunk_bytes=1 << 18)).run()
    assert given_back, "the merge gave nothing back"
    for path, a, b in given_back:
        assert not before[path][a:b].any(), f"{path}: pages {a}..{b} were cached before the merge"


def test_the_reader_asks_for_the_next_rows_only_where_the_kernel_does_not_read_ahead(
        mb_set: list[str], tmp_path, monkeypatch, readahead: bool) -> None:
    """A cold merge: with the kernel's read-ahead, no shard is set to random reads and nothing is
    asked for ahead; without it, the shards read are and the next rows are asked for."""
    shards = _shards(mb_set)
    for p in shards:
        _cold(p)
    plan = _ties(mb_set)  # (its header reads are the plan's, not the run's)
    import sys

    said: list[str] = []
    for name in ("no_readahead", "prefetch", "drop"):
        real = getattr(pagecache, name)

        def call(*a, _n=name, _f=real):  # (reads of headers alone set random reads too: not counted)
            if _n != "no_readahead" or sys._getframe(1).f_code.co_name == "pread_rows":
                said.append(_n)
            return _f(*a)

        monkeypatch.setattr(pagecache, name, call)
    Executor(plan, str(tmp_path / "out"), RunOptions(max_memory=ROOMY, chunk_bytes=1 << 18)).run()
    assert "drop" in said  # pages brought in are given back either way
    assert ("no_readahead" in said) is not readahead
    assert ("prefetch" in said) is not readahead

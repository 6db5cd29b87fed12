"""Whether the kernel reads ahead for a merge's inputs: the memory the process may use (its memory
cgroup's limit, v2 memory.max or v1 memory.limit_in_bytes, the smallest on the way up; else the
machine's) against what the merge is expected to hold and two read-ahead windows per input model."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import in_child_cgroup
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import executor, limits, pagecache
from streammerge.config import parse_config
from streammerge.executor import READAHEAD_WINDOWS, Executor, readahead_fits
from streammerge.limits import cgroup_memory
from streammerge.options import RunOptions
from streammerge.planner import make_plan

V1_UNLIMITED = 9223372036854771712  # what cgroup v1 writes for no limit (4 KiB pages)
LIMIT = st.one_of(st.none(), st.integers(1 << 20, 1 << 40))


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(LIMIT, min_size=1, max_size=4), v2=st.booleans(), container=st.booleans())
def test_the_smallest_memory_limit_on_the_way_up_counts(tmp_path_factory, levels, v2, container) -> None:
    """levels[0] is the mount's root, levels[-1] the process's own cgroup (None: no limit there);
    `container`: the mount shows the process's cgroup as its root."""
    root = tmp_path_factory.mktemp("cg")
    names = [f"l{k}" for k in range(1, len(levels))]
    base = root if v2 else root / "memory"
    folders = [base] if container else [base.joinpath(*names[:k]) for k in range(len(levels))]
    shown = levels[-1:] if container else levels
    for folder, limit in zip(folders, shown):
        folder.mkdir(parents=True, exist_ok=True)
        if v2:
            (folder / "memory.max").write_text(f"{limit}\n" if limit is not None else "max\n")
        else:
            (folder / "memory.limit_in_bytes").write_text(f"{limit if limit is not None else V1_UNLIMITED}\n")
    own = "/" + "/".join(names)
    proc = root / "proc-cgroup"
    proc.write_text(f"0::{own}\n" if v2 else f"2:cpuacct,cpu:/elsewhere\n4:memory:{own}\n0::/\n")
    limits = [x for x in shown if x is not None]
    assert cgroup_memory(str(root), str(proc)) == (min(limits) if limits else None)


def test_a_real_memory_cgroup_is_read() -> None:
    """A child cgroup of this process's own with a 700 MiB limit: a process inside reads that limit."""
    limit = str(700 << 20)
    out = in_child_cgroup("memory", {"memory.limit_in_bytes": limit}, {"memory.max": limit},
                          "from streammerge.limits import cgroup_memory; print(cgroup_memory())")
    assert out.split() == [limit]


class _Index:
    def __init__(self, shard: str | None) -> None:
        self.tensors = {} if shard is None else {"w": type("Ref", (), {"shard": shard})()}


class _Model:
    def __init__(self, shard: str | None) -> None:
        self.index = _Index(shard)


class _Plan:
    def __init__(self, shards: list[str | None]) -> None:
        self.models = [_Model(s) for s in shards]


@settings(max_examples=200, deadline=None)
@given(models=st.integers(0, 20), empty=st.integers(0, 3), window=st.integers(4 << 10, 64 << 20),
       budget=st.integers(1 << 20, 1 << 36), spare=st.integers(-(1 << 30), 1 << 30))
def test_the_kernel_reads_ahead_where_two_windows_per_input_fit_beside_what_the_merge_holds(
        models, empty, window, budget, spare) -> None:
    """Room for READAHEAD_WINDOWS windows of every model with a shard (a model with none counts
    nothing) beside what the merge holds, under the limit: the kernel's read-ahead; any less: the
    reader's."""
    plan = _Plan(["/x/shard"] * models + [None] * empty)
    room = READAHEAD_WINDOWS * window * models
    real = pagecache.readahead_bytes
    pagecache.readahead_bytes = lambda path, default=0: window  # type: ignore[assignment]
    try:
        got = readahead_fits(plan, budget, limit=budget + room + spare)  # type: ignore[arg-type]
    finally:
        pagecache.readahead_bytes = real  # type: ignore[assignment]
    assert got is (spare >= 0)


def test_without_a_cgroup_limit_the_machines_memory_counts(monkeypatch) -> None:
    import psutil

    monkeypatch.setattr(limits, "cgroup_memory", lambda: None)
    total = psutil.virtual_memory().total
    plan = _Plan([__file__])
    need = READAHEAD_WINDOWS * pagecache.readahead_bytes(__file__)
    assert readahead_fits(plan, total - need) is True  # type: ignore[arg-type]
    assert readahead_fits(plan, total - need + 1) is False  # type: ignore[arg-type]
    monkeypatch.setattr(limits, "cgroup_memory", lambda: 1 << 30)
    assert readahead_fits(plan, (1 << 30) - need) is True  # type: ignore[arg-type]
    assert readahead_fits(plan, (1 << 30) - need + 1) is False  # type: ignore[arg-type]


def test_a_files_read_ahead_window_is_its_devices() -> None:
    """The window /sys gives for this file's device (its bdi), a positive multiple of 1 KiB; a
    path that does not exist gets the default."""
    got = pagecache.readahead_bytes(__file__)
    dev = os.stat(__file__).st_dev
    bdi = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    if os.path.exists(bdi):
        with open(bdi) as f:
            assert got == int(f.read()) << 10
    assert got > 0 and got % 1024 == 0
    assert pagecache.readahead_bytes("/no/such/file", default=12345) == 12345


@settings(max_examples=300, deadline=None)
@given(cached=st.lists(st.booleans(), max_size=80), pages=st.integers(0, 90))
def test_the_sweep_gives_back_every_page_of_the_file_not_cached_before(cached, pages) -> None:
    """At the merge's end every page of the file that was not cached before is given back, whether
    or not a finished range covers it (the kernel's read-ahead reaches past them); none that was."""
    bits = np.packbits(np.array(cached, dtype=np.uint8)) if cached else np.zeros(0, dtype=np.uint8)
    dropped: list[tuple[int, int]] = []
    real = pagecache.drop
    pagecache.drop = lambda fd, runs: dropped.extend(runs)  # type: ignore[assignment]
    try:
        pagecache.Residency(bits, pages).sweep(-1)
    finally:
        pagecache.drop = real  # type: ignore[assignment]
    given = [p for a, b in dropped for p in range(a, b)]
    if all(p < len(cached) and cached[p] for p in range(pages)):
        assert given == []  # a file cached whole: nothing asked of the kernel
    else:
        assert given == [p for p in range(pages) if not (p < len(cached) and cached[p])]


@pytest.mark.parametrize("window", [None, 1 << 40], ids=["device-window", "window-of-a-TiB"])
def test_a_run_fits_the_windows_beside_what_it_expects_to_hold_not_beside_its_budget(
        tiny_set, tmp_path, monkeypatch, window) -> None:
    """Inside a memory cgroup exactly as large as the budget (a container run with --max-memory its
    size) a small merge, expected to hold far less than its budget, leaves the kernel's read-ahead
    windows room beside it: the kernel reads ahead. Windows too large for any room: it does not."""
    budget = 2 << 30
    monkeypatch.setattr(executor, "memory_limit", lambda: budget)
    if window is not None:
        monkeypatch.setattr(pagecache, "readahead_bytes", lambda path, default=0: window)
    text = ("merge_method: linear\nmodels:\n"
            + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5}}\n" for f in tiny_set[:3])
            + "dtype: bfloat16\n")
    was = pagecache.kernel_readahead()
    try:
        Executor(make_plan(parse_config(text), budget), str(tmp_path / "out"), RunOptions(max_memory=budget)).run()
        assert pagecache.kernel_readahead() is (window is None)
    finally:
        pagecache.kernel_readahead(was)

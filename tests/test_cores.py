"""The cores a run may use: affinity capped by a cgroup CPU quota (v2 cpu.max, v1 cfs files), the
process's own cgroup's and every one above it."""

from __future__ import annotations

import math
import os

import pytest
from helpers import in_child_cgroup
from hypothesis import given, settings
from hypothesis import strategies as st
from test_all_methods import config_text

from streammerge.limits import cgroup_cpus

QUOTA = st.one_of(st.none(), st.tuples(st.integers(1_000, 1_600_000), st.sampled_from([50_000, 100_000, 250_000])))


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(QUOTA, min_size=1, max_size=4), v2=st.booleans(), container=st.booleans(),
       mount=st.sampled_from(["cpu", "cpu,cpuacct"]))
def test_the_smallest_quota_on_the_way_up_counts(tmp_path_factory, levels, v2, container, mount) -> None:
    """levels[0] is the mount's root, levels[-1] the process's own cgroup; `container`: the mount
    shows the process's cgroup as its root (the cgroup file names a path the mount does not have)."""
    root = tmp_path_factory.mktemp("cg")
    names = [f"l{k}" for k in range(1, len(levels))]
    base = root if v2 else root / mount
    folders = [base] if container else [base.joinpath(*names[:k]) for k in range(len(levels))]
    shown = levels[-1:] if container else levels
    for folder, q in zip(folders, shown):
        folder.mkdir(parents=True, exist_ok=True)
        if v2:
            (folder / "cpu.max").write_text(f"{q[0]} {q[1]}\n" if q else "max 100000\n")
        else:
            (folder / "cpu.cfs_quota_us").write_text(f"{q[0]}\n" if q else "-1\n")
            (folder / "cpu.cfs_period_us").write_text(f"{q[1] if q else 100000}\n")
    own = "/" + "/".join(names)
    proc = root / "proc-cgroup"
    proc.write_text(f"0::{own}\n" if v2 else f"4:memory:/elsewhere\n2:cpuacct,cpu:{own}\n0::/\n")
    quotas = [q[0] / q[1] for q in shown if q is not None]
    assert cgroup_cpus(str(root), str(proc)) == (max(1, math.ceil(min(quotas))) if quotas else None)


def test_a_real_cgroup_quota_caps_the_cores() -> None:
    """Half a CPU given to a child cgroup of this process's own: the run counts one core."""
    out = in_child_cgroup("cpu", {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"},
                          {"cpu.max": "50000 100000"}, "from streammerge.executor import cores; print(cores())")
    assert out.split() == ["1"]


def test_cgroup_quota_v2_v1_and_none(tmp_path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box\n")
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(str(tmp_path), str(proc)) == 2  # 1.5 CPUs, rounded up
    (tmp_path / "box" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(str(tmp_path), str(proc)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(str(v1), str(tmp_path / "missing")) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(str(v1), str(tmp_path / "missing")) is None
    assert cgroup_cpus(str(tmp_path / "nothing"), str(tmp_path / "missing")) is None



def test_default_threads_are_the_cores_this_process_may_use_at_most_four() -> None:
    from streammerge.executor import THREADS_MAX, default_threads

    assert THREADS_MAX == 4
    assert default_threads(2, 2) == 2
    assert default_threads(3, 8) == 3  # never more than the cores available (a cgroup quota)
    assert default_threads(16, 8) == 4  # never more than THREADS_MAX: past it the merges wait on memory
    assert default_threads(16, 2) == 2  # never more than torch's own count (physical cores)
    assert default_threads(0, 4) == 1  # never none


@settings(max_examples=300, deadline=None)
@given(torch_threads=st.integers(1, 64), available=st.integers(1, 64), overlap=st.booleans(),
       io_bound=st.booleans(), asked=st.booleans())
def test_compute_threads(torch_threads, available, overlap, io_bound, asked) -> None:
    """-j is taken as given, but for the core the reader keeps when reading ahead on every core;
    without it no more than THREADS_MAX, or IO_BOUND_THREADS_MAX for a method that reads more than
    it computes; never none."""
    from streammerge.executor import IO_BOUND_THREADS_MAX, THREADS_MAX, compute_threads

    got = compute_threads(torch_threads, available, overlap, io_bound, asked)
    reader_core = overlap and available > 1 and torch_threads >= available
    wanted = available - 1 if reader_core else torch_threads
    if not asked:
        wanted = min(wanted, IO_BOUND_THREADS_MAX if io_bound else THREADS_MAX)
    assert got == wanted >= 1
    assert IO_BOUND_THREADS_MAX == 2


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_a_run_without_j_takes_the_capped_threads(method, tiny_set, tmp_path) -> None:
    """What an Executor runs with, torch set to 8 threads as on an 8-core machine: 4 compute
    threads for DARE-TIES and 2 for linear without -j (this machine's cores do not count there but
    for the reader's core), and 8 with -j 8 (or one less, for the reader)."""
    import torch

    from streammerge.config import parse_config
    from streammerge.executor import Executor, cores
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan

    plan = make_plan(parse_config(config_text(method, tiny_set)))
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        for asked, overlap in ((None, False), (None, True), (8, False), (8, True)):
            ex = Executor(plan, str(tmp_path / "out"), RunOptions(num_threads=asked, overlap=overlap))
            reader = overlap and cores() > 1 and 8 >= cores()
            full = cores() - 1 if reader else 8
            assert ex._threads() == (full if asked else min(full, 2 if method == "linear" else 4)), (asked, overlap)
    finally:
        torch.set_num_threads(before)


def test_a_quarter_of_the_cores_read_ahead() -> None:
    """With a read-ahead (4 cores or more), blocks are read by a quarter of the cores' threads:
    reading was about a quarter of the 15-model DARE-TIES's CPU (tools/thread_cpu.py)."""
    from streammerge.executor import OVERLAP_MIN_CORES, read_threads

    assert [read_threads(c) for c in (1, 2, OVERLAP_MIN_CORES, 7, 8, 16, 32, 64, 256)] == [1, 1, 1, 1, 2, 4, 8, 8, 8]


def test_helper_threads_by_default_with_4_cores_or_for_methods_that_read_more_than_they_compute() -> None:
    """A read-ahead beside one compute thread on 2-3 cores only for methods declared io_bound
    (measured faster so, quiet and loaded); on 4 or more for every method; never on one core
    nor, below 4, on a GPU."""
    from types import SimpleNamespace

    from streammerge.executor import OVERLAP_MIN_CORES, default_overlap
    from streammerge.methods import METHODS

    light = {n for n, m in METHODS.items() if m.io_bound}
    assert {"linear", "slerp", "task_arithmetic", "passthrough"} == light
    for name, method in METHODS.items():
        for device in ("cpu", "cuda"):
            plan = SimpleNamespace(method=method, device=device)
            got = [default_overlap(plan, c) for c in (1, 2, 3, OVERLAP_MIN_CORES, 16)]  # type: ignore[arg-type]
            few = name in light and device == "cpu"
            assert got == [False, few, few, True, True], (name, device)


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_plan_shows_the_threads_a_run_takes(method, tiny_set, tmp_path) -> None:
    """`streammerge plan` says the compute threads, cores and read-ahead a run of the same options
    takes here: its figures (executor.planned_threads, in --json) are the Executor's, with torch's
    thread count as the API sets it for the run, for -j or none and --overlap or not."""
    import json

    import torch
    from click.testing import CliRunner

    from streammerge.cli import main
    from streammerge.config import parse_config
    from streammerge.executor import Executor, cores, default_threads
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan

    text = config_text(method, tiny_set)
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    plan = make_plan(parse_config(text))
    before = torch.get_num_threads()
    try:
        for j in (None, 1, 3):
            for overlap in (None, True, False):
                flags = (["-j", str(j)] if j else []) + {True: ["--overlap"], False: ["--no-overlap"]}.get(overlap, [])
                r = CliRunner().invoke(main, ["plan", str(cfg), "--json", *flags])
                assert r.exit_code == 0, r.output
                shown = json.loads(r.output)["threads"]
                torch.set_num_threads(j or default_threads(cores(), before))  # as api.merge does for the run
                ex = Executor(plan, str(tmp_path / "out"), RunOptions(num_threads=j, overlap=overlap))
                assert shown["compute"] == ex._threads() and shown["read_ahead"] == ex.overlap, (j, overlap, shown)
                assert shown["cores"] == cores() and (shown["reading"] > 0) == ex.overlap
                torch.set_num_threads(before)
                text_out = CliRunner().invoke(main, ["plan", str(cfg), *flags]).output
                assert f"threads: {shown['compute']} compute thread(s) of {cores()} core(s)" in text_out
    finally:
        torch.set_num_threads(before)


def test_the_benchmarks_threads_column(tiny_set, tmp_path) -> None:
    """tools/bench_speed.py labels each variant's row with the compute threads (and reading
    threads) its run takes here, as `plan` says: -j 1 one thread, reading ahead on a quarter of
    the cores from 4 cores; a GPU variant '?' where torch sees no GPU."""
    import importlib
    import sys

    import torch

    from streammerge.executor import OVERLAP_MIN_CORES, cores, read_threads

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    bench = importlib.import_module("bench_speed")
    cfg = tmp_path / "c.yml"
    cfg.write_text(config_text("dare_ties", tiny_set))
    ahead = f"+r{read_threads(cores())}" if cores() >= OVERLAP_MIN_CORES else ""
    assert bench.threads_of(str(cfg), "j1") == "1" + ahead
    assert bench.threads_of(str(cfg), "no-overlap") == str(min(cores(), 4, torch.get_num_threads()))
    if not torch.cuda.is_available():
        assert bench.threads_of(str(cfg), "cuda") == "?"


def test_a_terminated_benchmark_stops_its_spinning_processes() -> None:
    """tools/bench_common.busy's spinners (a loaded laptop) end with the benchmark when a timeout's
    SIGTERM ends it, not only on a normal exit: by default SIGTERM ends Python before any `finally`."""
    import signal
    import subprocess
    import sys

    import psutil

    tools = os.path.join(os.path.dirname(__file__), "..", "tools")
    code = (f"import sys, time; sys.path.insert(0, {tools!r}); import bench_common\n"
            "with bench_common.busy(2):\n    print('spinning', flush=True); time.sleep(60)\n")
    spinners: list[psutil.Process] = []
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "spinning"
            spinners = psutil.Process(p.pid).children()
            assert len(spinners) == 2
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 128 + signal.SIGTERM
            _gone, alive = psutil.wait_procs(spinners, timeout=10)
            assert not alive, f"spinners left running: {[s.pid for s in alive]}"
        finally:  # whatever failed, nothing of this test spins on
            p.kill()
            for s in spinners:
                if s.is_running():
                    s.kill()

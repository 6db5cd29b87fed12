"""The runner's compute threads (runner.Workers): every method gives the same bytes, and the
report the same figures, whatever the number of threads and the sub-chunk size; a sub-chunk
that fails stops the others without a hang; a budget too small for sub-chunks per thread
computes on fewer, and threads never shrink the blocks much."""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass

import pytest
import torch
from helpers import context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_all_methods import RECIPES, config_text

from streammerge import runner
from streammerge.budget import (
    COMPUTE_BYTES,
    COMPUTE_ELEMENTS,
    COMPUTE_ELEMENTS_MAX,
    chunk_rows,
    compute_row_bytes,
    live_pieces,
    sub_elements,
    sub_rows,
)
from streammerge.dtypes import itemsize
from streammerge.methods import METHODS, MergeOp, MethodDef, TaskContext
from streammerge.methods.base import InOrder, fixed_cost
from streammerge.planner import Task
from streammerge.runner import Workers, run_task
from streammerge.schedule import Read, Step, TaskSchedule
from streammerge.stats import TensorStats

DENSE = {"weight": 0.4, "density": 0.6}
INPUTS = {  # method: (per-input parameters, shared parameters, base index)
    "linear": ([{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], {}, None),
    "slerp": ([{}, {}], {"t": 0.3}, 0),
    "nuslerp": ([{}, {"weight": 0.4}, {"weight": 0.6}], {}, 0),
    "multislerp": ([{}, {"weight": 1.0}, {"weight": 2.0}], {}, 0),
    "karcher": ([{}, {}, {}], {}, None),
    "passthrough": ([{"scale": 0.5}], {}, None),
    "model_stock": ([{}, {}, {}, {}], {}, 0),
    "arcee_fusion": ([{}, {}], {}, 0),
    "nearswap": ([{}, {}], {"t": 0.001}, 0),
    "sce": ([{}, {}, {}, {}], {"select_topk": 0.5}, 0),
    "ram": ([{}, {}, {}, {}], {}, 0),
    "ramplus_tl": ([{}, {}, {}, {}], {}, 0),
    "task_arithmetic": ([{}, DENSE, DENSE], {}, 0),
    "ties": ([{}, DENSE, {"weight": 0.7, "density": 0.3}], {}, 0),
    "dare_linear": ([{}, DENSE, DENSE], {}, 0),
    "dare_ties": ([{}, DENSE, DENSE], {}, 0),
    "breadcrumbs": ([{}, DENSE, DENSE], {"gamma": 0.05}, 0),
    "breadcrumbs_ties": ([{}, DENSE, DENSE], {"gamma": 0.05}, 0),
    "della": ([{}, DENSE, DENSE], {"epsilon": 0.1}, 0),
    "della_linear": ([{}, DENSE, DENSE], {"epsilon": 0.1}, 0),
}


def test_every_method_is_covered() -> None:
    assert set(INPUTS) == set(METHODS)


@dataclass
class FakeTask:
    """What run_task reads of a planner Task."""

    name: str
    ctx: TaskContext
    rows: int
    copy_exact: bool = False
    compute: str = "F32"  # the dtype a narrow block's sub-chunks are converted to (these blocks are float32)
    out_dtype: str = "F32"  # the runner casts to it: float32 keeps every bit of the kernels' rows


class Blocks:
    """One block holding the whole tensor (a fresh copy: the apply pass may overwrite it)."""

    def __init__(self, x: torch.Tensor, read: Read) -> None:
        self.x, self.read = x, read
        self.shares = 0.0

    def take(self) -> tuple[Read, torch.Tensor]:
        return self.read, self.x.clone()

    def done(self, read: Read) -> None:
        pass

    def advanced(self, read: Read, share: float) -> None:
        self.shares += share

    def unneeded(self, task: int, p: int) -> None:
        pass


def merged(method: MethodDef, ctx: TaskContext, x: torch.Tensor, sub: int, threads: int,
           pool: int | None = None) -> tuple[torch.Tensor, dict]:
    """The output rows and the report's record of running the real runner over x (n, rows, cols)
    in sub-chunks of `sub` rows, scheduled for `threads` compute threads, on a pool of `pool`
    (default `threads`)."""
    rows = x.shape[1]
    passes = method.cost(ctx).stat_passes
    read = Read(0, 0, rows, True, 0)
    sched = TaskSchedule(0, sub, threads, passes, True, True, (Step(read, tuple(range(passes + 1))),), 0, 0)
    task = FakeTask(ctx.tensor, ctx, rows)
    stats = TensorStats(x.shape[0], rows, ctx.base)
    blocks = Blocks(x, read)
    with Workers(pool or threads) as workers:
        parts = list(run_task(task, sched, blocks, method, stats, workers))  # type: ignore[arg-type]
    assert [r0 for r0, _ in parts] == list(range(0, rows, sub))  # in row order
    assert blocks.shares == pytest.approx(1.0)
    return torch.cat([y for _, y in parts]), stats.record()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(INPUTS)), rows=st.integers(1, 40), cols=st.integers(1, 24),
       sub=st.integers(1, 6), threads=st.integers(2, 5), levels=st.sampled_from([3, 7, 1000]), seed=st.integers(0, 99))
def test_bytes_and_report_do_not_depend_on_threads(method: str, rows: int, cols: int, sub: int, threads: int,
                                                   levels: int, seed: int) -> None:
    params, shared, base = INPUTS[method]
    ctx = context(method, params, shared, base=base, tensor="model.layers.0.mlp.up_proj.weight", shape=(rows, cols),
                  seed=seed)
    g = torch.Generator().manual_seed(seed)
    # few distinct values: many elements tie at TIES's threshold, so the ordered tie count is exercised
    x = torch.randint(-levels, levels + 1, (len(params), rows, cols), generator=g).float() / levels
    m = METHODS[method]
    one, one_record = merged(m, ctx, x, sub, 1)
    many, many_record = merged(m, ctx, x, sub, threads)
    assert torch.equal(one.view(torch.int32), many.view(torch.int32))  # the same bits, NaN and -0.0 alike
    assert one_record == many_record


class Failing(MergeOp):
    """Every sub-chunk takes its turn in order, slowly; the one at `bad` raises first."""

    def __init__(self, ctx: TaskContext, bad: int) -> None:
        self.order = InOrder()
        self.bad = bad
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.order.abort()

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if row0 == self.bad:
            raise ValueError(f"row {row0} is bad")
        with self.order.turn(row0, x.shape[1]):
            threading.Event().wait(0.01)
        return x[0].clone()


def failure_of(method: MethodDef, monkeypatch: pytest.MonkeyPatch) -> BaseException | None:
    """What merging a 30-row block in one-row sub-chunks on 4 threads with `method` raised (None:
    nothing), failing the test if the runner has not returned within a minute."""
    monkeypatch.setattr(runner, "PARALLEL_MIN_ELEMENTS", 0)  # a tiny block, handed out all the same
    ctx = context("linear", [{"weight": 1.0}], shape=(30, 4))
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            merged(method, ctx, torch.ones(1, 30, 4), 1, 4)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 (the test looks at what it was)
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the runner hung after a sub-chunk failed"
    return result[0]


@pytest.mark.parametrize("bad", [0, 3, 29])
def test_a_failing_sub_chunk_stops_the_others_without_a_hang(bad: int, monkeypatch) -> None:
    ops: list[Failing] = []
    got = failure_of(MethodDef("failing", (), "ignored", 1, 1, make=lambda c: ops.append(Failing(c, bad)) or ops[-1]),
                     monkeypatch)
    assert isinstance(got, ValueError) and str(got) == f"row {bad} is bad"
    assert len(ops) == 1


class FailingObserve(Failing):
    """The same in a statistics pass (sub-chunks in any order, Workers.each): turns are taken in
    flat-index order, so a thread past the bad sub-chunk waits for a turn that never comes."""

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        if row0 == self.bad:
            raise ValueError(f"row {row0} is bad")
        with self.order.turn(row0 * x.shape[2], x.shape[1] * x.shape[2]):
            threading.Event().wait(0.01)


@pytest.mark.parametrize("bad", [0, 3, 29])
def test_a_failing_statistics_sub_chunk_stops_the_others_without_a_hang(bad: int, monkeypatch) -> None:
    ops: list[FailingObserve] = []
    got = failure_of(MethodDef("failing", (), "ignored", 1, 1, make=lambda c: ops.append(FailingObserve(c, bad))
                               or ops[-1], cost=fixed_cost(1, 1.0)), monkeypatch)
    assert isinstance(got, ValueError) and str(got) == f"row {bad} is bad"
    assert len(ops) == 1 and ops[0].aborted  # the threads waiting their turn were woken


class Counting(MergeOp):
    """Notes how many sub-chunks its statistics pass and its apply pass compute at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = {0: 0, 1: 0}

    def _busy(self, p: int) -> None:
        with self.lock:
            self.now += 1
            self.most[p] = max(self.most[p], self.now)
        threading.Event().wait(0.005)
        with self.lock:
            self.now -= 1

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        self._busy(0)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        self._busy(1)
        return x[0].clone()


@pytest.mark.parametrize(("budgeted", "pool"), [(2, 8), (3, 4), (5, 16)])
def test_sub_chunks_for_fewer_threads_than_the_pool_still_share_the_threads(budgeted: int, pool: int,
                                                                          monkeypatch) -> None:
    """A schedule whose budget holds sub-chunks for fewer threads than the pool has computes on
    several of them, never more sub-chunks at once than it holds (it ran on one thread before)."""
    ctx = context("linear", [{"weight": 1.0}], shape=(64, 4))
    monkeypatch.setattr(runner, "PARALLEL_MIN_ELEMENTS", 0)  # a tiny block, handed out all the same
    op = Counting()
    method = MethodDef("counting", (), "ignored", 1, 1, make=lambda c: op, cost=fixed_cost(1, 1.0))
    merged(method, ctx, torch.ones(1, 64, 4), 1, budgeted, pool)
    assert 1 < op.most[0] <= live_pieces(budgeted) and 1 < op.most[1] <= live_pieces(budgeted), op.most


def tallest_task(method: str, folders: list[str]) -> Task:
    """The task with the most rows of test_all_methods' recipe for `method` on `folders`."""
    from streammerge.config import parse_config
    from streammerge.planner import make_plan

    return max(make_plan(parse_config(config_text(method, folders))).tasks, key=lambda t: t.rows)


def test_a_budget_without_room_for_sub_chunks_per_thread_computes_on_fewer(tiny_set) -> None:
    from streammerge.budget import block_bytes, compute_row_bytes, input_row_bytes, piece_bytes

    task = tallest_task("ties", tiny_set)
    per_row, compute, piece = input_row_bytes(task), compute_row_bytes(task), piece_bytes(task)
    assert piece > 0  # the report's sampled rows, counted once per live sub-chunk
    roomy = per_row * 10 + live_pieces(4) * (5 * compute + piece)
    block, sub, threads = chunk_rows(task, roomy, threads=4)
    assert threads == 4 and block_bytes(task, block, sub, 4) <= roomy
    tight = 2 * live_pieces(4) * (compute + piece) - 1  # one-row sub-chunks for 4 threads would take over half
    block, sub, threads = chunk_rows(task, tight, threads=4)
    assert threads < 4 and block_bytes(task, block, sub, threads) <= tight
    tight = 2 * live_pieces(2) * (compute + piece) - 1
    assert tight >= per_row + compute + piece  # room for one thread's one-row sub-chunk and a row read
    block, sub, threads = chunk_rows(task, tight, threads=4)
    assert threads == 1 and block_bytes(task, block, sub, 1) <= tight


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(RECIPES)), threads=st.integers(2, 16),
       overlap=st.booleans(), share=st.floats(0.0, 1.2))
def test_threads_never_starve_the_blocks(tiny_set, method, threads, overlap, share) -> None:
    """More threads may shrink the sub-chunks, never the blocks much: a block with N threads holds
    at least half the rows it holds on one (sub-chunks filling the budget once left 4-row blocks
    where one thread read 2,136), no sub-chunk is larger than its block, and the chunk fits."""
    from streammerge.budget import block_bytes, row_cost

    task = tallest_task(method, tiny_set)
    budget = row_cost(task) + int(share * task.rows * row_cost(task) * 4)
    one, _, _ = chunk_rows(task, budget, overlap)
    block, sub, used = chunk_rows(task, budget, overlap, threads=threads)
    assert sub <= block <= task.rows
    assert block >= one // 2 - 1, f"{threads} threads read {block}-row blocks where one reads {one}"
    assert block_bytes(task, block, sub, used) <= budget


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 24), compute=st.sampled_from(["F32", "F64", "BF16"]), cols=st.integers(1, 20_000))
def test_sub_chunks_hold_about_the_same_bytes_whatever_the_input_count(tiny_set, monkeypatch, n, compute,
                                                                       cols) -> None:
    """Few inputs get more elements per input (a 3-model linear merge's 128K-element sub-chunks
    spent more time handed around than computed), never more than COMPUTE_BYTES of inputs unless
    the floor for many inputs says so; more inputs never get more elements each (torch's forms: the
    compiled loops take their largest sub-chunks, the test below)."""
    from streammerge.methods import fused

    monkeypatch.setattr(fused, "loaded", lambda: None)
    base = tallest_task("linear", tiny_set)

    def task(k: int) -> Task:
        return dataclasses.replace(base, inputs=tuple(base.inputs[i % len(base.inputs)] for i in range(k)),
                                   compute=compute, shape=(10**6, cols))

    e = sub_elements(task(n))
    assert COMPUTE_ELEMENTS <= e <= COMPUTE_ELEMENTS_MAX
    assert n * itemsize(compute) * e <= max(COMPUTE_BYTES, n * itemsize(compute) * COMPUTE_ELEMENTS)
    assert e == COMPUTE_ELEMENTS_MAX or n * itemsize(compute) * (e + 1) > COMPUTE_BYTES  # as many as fit
    assert sub_elements(task(n + 1)) <= e
    assert sub_rows(task(n)) == max(1, e // cols)


def test_the_compiled_loops_take_the_largest_sub_chunks_whatever_the_input_count(tiny_set, monkeypatch) -> None:
    """Where the compiled loops take a task's blocks as read (DARE-TIES: Cost.raw_passes), its
    sub-chunks hold COMPUTE_ELEMENTS_MAX elements per input even for 15 inputs (linear's loop too);
    with torch's forms, or for a method without such loops (karcher), the COMPUTE_BYTES share still
    rules."""
    from streammerge.methods import fused

    def task(method: str, n: int) -> Task:
        base = tallest_task(method, tiny_set)
        return dataclasses.replace(base, inputs=tuple(base.inputs[i % len(base.inputs)] for i in range(n)),
                                   shape=(10**6, 1024))

    dare, linear, karcher = task("dare_ties", 15), task("linear", 15), task("karcher", 15)
    assert dare.cost.raw_passes and linear.cost.raw_passes and not karcher.cost.raw_passes
    share = max(COMPUTE_ELEMENTS, COMPUTE_BYTES // (15 * itemsize(dare.compute)))
    assert share < COMPUTE_ELEMENTS_MAX
    monkeypatch.setattr(fused, "loaded", lambda: fused)  # this process merges with the loops
    assert sub_elements(dare) == COMPUTE_ELEMENTS_MAX and sub_rows(dare) == COMPUTE_ELEMENTS_MAX // 1024
    assert sub_elements(linear) == COMPUTE_ELEMENTS_MAX
    assert sub_elements(karcher) == share
    monkeypatch.setattr(fused, "loaded", lambda: None)  # torch's forms
    assert sub_elements(dare) == sub_elements(linear) == share


@pytest.mark.parametrize("compute", ["F32", "F64"])
@pytest.mark.parametrize("loops", [True, False])
def test_the_compiled_loops_temporaries_are_counted_where_they_run(tiny_set, monkeypatch, compute, loops) -> None:
    """A sub-chunk row of DARE-TIES costs its loops' temporaries (Cost.loop_temp_rows) where this
    process merges a float32 task with them, torch's forms' (temp_rows) otherwise."""
    from streammerge.methods import fused

    dare = dataclasses.replace(tallest_task("dare_ties", tiny_set), compute=compute, shape=(10**6, 1024))
    assert dare.cost.loop_temp_rows is not None and dare.cost.loop_temp_rows < dare.cost.temp_rows
    as_torch = dataclasses.replace(dare, cost=dataclasses.replace(dare.cost, loop_temp_rows=None))
    monkeypatch.setattr(fused, "loaded", (lambda: fused) if loops else (lambda: None))
    saved = (dare.cost.temp_rows - dare.cost.loop_temp_rows) * 1024 * itemsize(compute)
    got = compute_row_bytes(as_torch) - compute_row_bytes(dare)
    assert abs(got - (saved if loops and compute == "F32" else 0)) <= 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(RECIPES)), threads=st.integers(1, 16), rows=st.integers(1, 5000),
       cols=st.integers(1, 4096))
def test_each_thread_has_a_piece_of_a_tensor_read_whole(tiny_set, method, threads, rows, cols) -> None:
    """Sub-chunks are at most a threads-th of the tensor's rows, so a tensor read whole in one
    block gives every thread a piece (512K-element sub-chunks left a 256-row attention tensor of
    a 15-model merge one piece, on one of the 2 threads)."""
    from streammerge.schedule import spans

    task = dataclasses.replace(tallest_task(method, tiny_set), shape=(rows, cols))
    sub = sub_rows(task, threads)
    assert len(spans(0, rows, sub)) >= min(threads, rows)
    assert sub == max(1, min(sub_rows(task), rows // threads))


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 5000), n=st.integers(1, 4), data=st.data())
def test_a_sub_chunk_copies_at_most_its_share_of_the_sample_and_one_row_more(rows, n, data) -> None:
    """What budget.piece_bytes stands on: the report's statistics copy, of a sub-chunk of s rows
    starting anywhere (TensorStats.before), at most s / stride + 1 rows of each input, stride being
    stride_for(rows): compute_row_bytes counts the s / stride, piece_bytes the one more."""
    from streammerge.budget import stride_for

    row0 = data.draw(st.integers(0, rows - 1))
    s = data.draw(st.integers(1, rows - row0))
    got = TensorStats(n, rows, 0).before(torch.zeros(n, s, 3), row0)
    copied = 0 if got is None else got[1].shape[1]
    assert copied <= s / stride_for(rows) + 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(RECIPES)), threads=st.integers(1, 16), rows=st.integers(1, 40_000),
       cols=st.integers(1, 16_384), share=st.floats(0.0, 1.5))
def test_a_tensor_that_fits_with_smaller_sub_chunks_is_read_whole(tiny_set, method, threads, rows, cols,
                                                                   share) -> None:
    """A tensor is read once, whole, whenever it fits with sub-chunks of WHOLE_SUB_ELEMENTS elements
    per input (a 3-model TIES's MLP tensors at 512 MiB were read three times, once per pass, for
    want of room for four 512-row sub-chunks); the sub-chunks are then as large as the room left
    allows, never larger than sub_rows, and the whole block keeps the budget. A tensor without
    statistics passes reads each row once whatever its blocks: its blocks hold STREAM_BLOCK_BYTES
    of inputs at most (one row where a row is more)."""
    from streammerge.budget import STREAM_BLOCK_BYTES, WHOLE_SUB_ELEMENTS, block_bytes, input_row_bytes, row_cost

    task = dataclasses.replace(tallest_task(method, tiny_set), shape=(rows, cols))
    most = sub_rows(task, threads)
    smallest = min(most, max(1, WHOLE_SUB_ELEMENTS // cols))
    whole = block_bytes(task, rows, smallest, threads)
    budget = int(share * whole) + row_cost(task)
    block, sub, used = chunk_rows(task, budget, threads=threads)
    assert 1 <= sub <= block <= rows
    streamed = max(1, STREAM_BLOCK_BYTES // input_row_bytes(task))
    if task.cost.stat_passes == 0:
        assert block <= streamed
    if whole <= budget and task.cost.stat_passes == 0 and streamed < rows:
        assert block == streamed and used == threads
    elif whole <= budget:
        assert block == rows and used == threads and smallest <= sub <= most
        assert sub == most or block_bytes(task, rows, sub + 1, threads) > budget
    assert block_bytes(task, block, sub, used) <= budget


def test_thread_cpu_tool_names_each_roles_cpu_time(tmp_path) -> None:
    """tools/thread_cpu.py runs a merge and lists the CPU time of the compute threads, the reading
    threads and the main thread, as the numbers its docstring and the README quote were taken."""
    import subprocess
    import sys

    import make_models

    # one layer, but blocks large enough to be handed to the threads (PARALLEL_MIN_ELEMENTS)
    folders = [str(tmp_path / n) for n in ("base", "ft1", "ft2")]
    make_models.write_set(folders, make_models.Shape(512, 2048, 1, 4, 2, 2048), seed=5)
    cfg = tmp_path / "ties.yml"
    cfg.write_text(config_text("ties", folders))
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "thread_cpu.py")
    r = subprocess.run([sys.executable, tool, "--compute-threads", "2", "--read-threads", "2", "--", "run", str(cfg),
                        str(tmp_path / "out"), "-q", "--overlap"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert {"MainThread", "streammerge-kernel", "streammerge-read", "streammerge-reader"} <= set(rows), r.stdout
    assert rows["streammerge-kernel"][1] == "2" and rows["streammerge-reader"][1] == "2", r.stdout
    import threading

    if os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat"):  # the scheduler's own times
        for row in rows.values():  # ... waited for a core S s
            assert row[-6:-2] == ["waited", "for", "a", "core"] and float(row[-2]) >= 0, r.stdout
    assert os.path.exists(tmp_path / "out" / "streammerge.manifest.json")
    bad = subprocess.run([sys.executable, tool, "--", "run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Missing argument 'CONFIG'" in bad.stderr and "Traceback" not in bad.stderr

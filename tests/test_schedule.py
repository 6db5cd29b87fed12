"""The pass schedule's order of reads: a tensor read in several blocks is read once per pass, the
apply pass in row order; where the method's statistics find the same in any block order the
passes alternate direction and share the block at each turn, one read fewer per statistics pass;
a block only passes the op turns out not to need run over is not read."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import assert_golden
from hypothesis import given
from hypothesis import strategies as st
from test_all_methods import RECIPES, config_text

from streammerge.budget import AHEAD_BLOCKS, widest_row
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.options import RunOptions
from streammerge.planner import make_plan
from streammerge.reader import InputReader
from streammerge.schedule import Read, make_schedule, pass_steps


@st.composite
def blockings(draw):  # type: ignore[no-untyped-def]
    """Contiguous blocks of 1..60 rows, cut at drawn places."""
    rows = draw(st.integers(1, 60))
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=8))) if rows > 1 else []
    edges = [0, *cuts, rows]
    return list(zip(edges, edges[1:]))


@given(blockings(), st.integers(0, 3), st.booleans())
def test_every_pass_sees_every_block_once_and_the_apply_pass_in_row_order(blocks, passes, any_order) -> None:
    steps = pass_steps(blocks, passes, any_order)
    visits = [(p, b) for b, ps in steps for p in ps]
    assert [p for p, _ in visits] == sorted(p for p, _ in visits)  # pass after pass, in order
    for p in range(passes + 1):
        seen = [b for q, b in visits if q == p]
        assert sorted(seen) == blocks  # each block once
        if p == passes or not any_order:
            assert seen == blocks  # row order: the apply pass always (its reads are hashed, its rows written)
    # a block is never read twice running: the one a pass ended with serves the next where it begins
    assert all(a[0] != b[0] for a, b in zip(steps, steps[1:]))
    n, k = len(blocks), passes + 1
    if n == 1:
        assert steps == [(blocks[0], tuple(range(k)))]
    elif any_order:
        assert len(steps) == k * n - passes  # one read saved at each turn between passes
        # alternating: the last statistics pass runs backwards, ending where the apply pass begins
        assert all(len(ps) == 1 or ps == (ps[0], ps[0] + 1) for _, ps in steps)
    else:
        assert len(steps) == k * n and all(len(ps) == 1 for _, ps in steps)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_pass_the_op_does_not_need_is_not_read(tiny_set, tmp_path, monkeypatch, overlap) -> None:
    """TIES's second radix pass, skipped where the first finds the threshold (bfloat16 models: as
    good as always), has none of the blocks only it runs over read: a tensor's blocks are read for
    every pass, or for all but that one. Blocks read in turn are skipped as they come; a thread
    reading ahead hears it when the first pass ends, before the runner gives back the block it
    ended with, so with room for one block ahead of none it reads exactly the same. Either way
    the bytes are the golden ones (those of the run that reads every tensor whole)."""
    monkeypatch.setenv("STREAMMERGE_JIT", "1")  # the compiled radix count (torch's form does not tell)
    plan = make_plan(parse_config(config_text("ties", tiny_set)))
    opts = RunOptions(max_memory=1 << 34, chunk_bytes=widest_row(plan)[0] * 2, overlap=overlap)
    loaded: list[Read] = []
    real = InputReader.load
    monkeypatch.setattr(InputReader, "load", lambda self, read: loaded.append(read) or real(self, read))
    if overlap:  # the read-ahead's room: the largest block, so it reads the next once the runner is done with one
        made = Executor._schedule
        monkeypatch.setattr(Executor, "_schedule", lambda self: dataclasses.replace(
            s := made(self), capacity=max(r.cost for r in s.reads())))
    out = str(tmp_path / "out")
    run = Executor(plan, out, opts)
    run.run()
    assert_golden("method/ties", out)
    skipped = 0
    for t in run._schedule().tasks:  # the schedule the run took (its threads are fixed now)
        every = [s.read for s in t.steps]
        needed = [s.read for s in t.steps if s.passes != (1,)]
        got = [r for r in loaded if r.task == t.task]
        assert got in (every, needed), t.task
        skipped += got != every
    assert skipped > 0


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_the_read_ahead_holds_the_block_computing_and_the_next_not_the_budget(tiny_set, method) -> None:
    """However large the budget, the reader may hold AHEAD_BLOCKS of the run's largest block at most
    (a read-ahead allowed the whole budget read a 7B-shaped linear merge's every input into fresh
    memory), and always room for the largest; the arena it reads into holds every block."""
    plan = make_plan(parse_config(config_text(method, tiny_set)))
    widest = widest_row(plan)[0]
    for chunk in (widest, 7 * widest, 1 << 20, 1 << 34):
        sched = make_schedule(plan, 1 << 40, overlap=True, chunk_bytes=chunk)
        largest = max(r.cost for r in sched.reads())
        assert largest <= sched.capacity <= min(max(chunk, widest), AHEAD_BLOCKS * largest), (method, chunk)
        assert sched.arena >= max(t.block_inputs for t in sched.tasks)


@pytest.mark.parametrize("method", ["linear", "passthrough", "model_stock"])
def test_a_method_without_loops_is_sized_alike_after_a_merge_with_them(tiny_set, monkeypatch, method) -> None:
    """Loops are chosen per merge (budget.loops_for): a method without compiled loops, planned in a
    process whose merge before it loaded them, kept that choice, and its rows were costed as if it
    computed with them (narrow blocks, the loops' temporaries): a linear merge's 262,144-column rows
    at 14 MiB against 54 MiB in a fresh process."""
    from streammerge.budget import loops_for

    plan = make_plan(parse_config(config_text(method, tiny_set)))
    fresh = widest_row(plan)[0], make_schedule(plan, 1 << 34, False).tasks
    monkeypatch.setenv("STREAMMERGE_JIT", "1")
    assert loops_for(make_plan(parse_config(config_text("dare_ties", tiny_set))))  # the merge before: loops
    monkeypatch.delenv("STREAMMERGE_JIT")
    assert (widest_row(plan)[0], make_schedule(plan, 1 << 34, False).tasks) == fresh

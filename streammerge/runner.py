"""The runner: one task and its blocks in, finished output rows out.

Imports schedule, stats, planner, methods, errors (and torch). Pure of the output folder, the
journal and the process: given a task, its schedule, a source of blocks (`take`/`done`) and
the method, it yields `(row0, rows)` in row order, in the compute dtype, on the device the
blocks are on. It may run beside the committer on the same thread, or in another process or
on another machine (the committer writes what it yields).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from .errors import PlanError
from .methods import MethodDef
from .planner import Task
from .schedule import Read, TaskSchedule, spans
from .stats import TensorStats


class BlockSource(Protocol):
    """Blocks in the order of the schedule's reads; each handed back with `done` once used, and
    `advanced(read, share)` told as each share of its work (a sub-chunk of one pass) is computed."""

    def take(self) -> tuple[Read, torch.Tensor | list[torch.Tensor]]: ...

    def done(self, read: Read) -> None: ...

    def advanced(self, read: Read, share: float) -> None: ...


def run_task(task: Task, sched: TaskSchedule, blocks: BlockSource, method: MethodDef,
             stats: TensorStats | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Task `task`'s output rows, as (first row, rows), in order; `stats` records what the merge did."""
    if task.copy_exact:
        yield from _copy(task, sched, blocks)
    else:
        yield from _merge(task, sched, blocks, method, stats)


def _merge(task: Task, sched: TaskSchedule, blocks: BlockSource, method: MethodDef,
           stats: TensorStats | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Each step's block through its passes: statistics passes observe it (a pass ends with the
    block that ends the tensor), the apply pass yields merged rows, sub-chunk by sub-chunk."""
    op = method.make(task.ctx)
    if sched.whole:
        op.hold_state()  # the apply pass sees the very blocks the statistics passes saw
    if stats is not None:
        op.tally = stats.tally
    for step in sched.steps:
        read, x = blocks.take()
        _check(read, step.read, task)
        assert isinstance(x, torch.Tensor)
        rows = read.r1 - read.r0
        for p in step.passes:
            for a, b in spans(0, rows, sched.sub):
                if p < sched.stat_passes:
                    op.observe(p, x[:, a:b], read.r0 + a)
                else:
                    before = stats.before(x[:, a:b], read.r0 + a) if stats is not None else None
                    y = op.apply(x[:, a:b], read.r0 + a)
                    if stats is not None and before is not None:
                        stats.after(before, y)
                    yield read.r0 + a, y
                blocks.advanced(read, (b - a) / rows / len(step.passes))
            if p < sched.stat_passes and read.r1 == task.rows:
                op.end_pass(p)
        del x
        blocks.done(read)


def _copy(task: Task, sched: TaskSchedule, blocks: BlockSource) -> Iterator[tuple[int, torch.Tensor]]:
    """A non-float tensor: its inputs must agree, and the first is written."""
    for step in sched.steps:
        read, parts = blocks.take()
        _check(read, step.read, task)
        assert isinstance(parts, list)
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise PlanError(f"tensor {task.name!r}: non-floating buffer differs between inputs; such tensors "
                            "cannot be merged, only copied when identical")
        yield read.r0, parts[0]
        del parts
        blocks.advanced(read, 1.0)
        blocks.done(read)


def _check(got: Read, want: Read, task: Task) -> None:
    if got != want:
        raise RuntimeError(f"internal error: {task.name}: the reader gave rows {got.r0}..{got.r1} where the "
                           f"schedule has {want.r0}..{want.r1}")

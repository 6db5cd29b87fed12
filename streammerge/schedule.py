"""The pass schedule: for each task still to merge, which blocks of rows are read, in what
order, and which of the method's passes run over each; computed once from the plan and the
memory budget, then followed by the reader and the runner alike.

Imports planner, budget, dtypes, errors (and torch, for the GPU's free memory). A task whose
whole tensor fits is read once: every pass runs over that one block (and the method may keep
per-element state between its passes). Otherwise each statistics pass reads the tensor again
in blocks, then the apply pass does; the apply pass's reads feed the input hashes, since it
reads every input row exactly once, in row order. Where the method's statistics find the same in
any block order (Cost.any_order) the passes alternate direction and share the block at each
turn (pass_steps): one block fewer read per statistics pass. Such a task's per-element state
(DARE's packed masks) is kept too when it fits in a reserve set aside from the chunk budget
(budget.hold_reserve), so the apply pass sees the statistics passes' very sub-chunks and need not
draw them again.

`--max-memory` reaches the chunk sizes here and only here: `make_schedule` takes the whole
process's budget and asks budget.py what the chunk buffers get.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import (
    AHEAD_BLOCKS,
    block_bytes,
    block_dtype,
    chunk_budget,
    chunk_rows,
    held_bytes,
    hold_reserve,
    loops_for,
    widest_row,
)
from .dtypes import itemsize
from .errors import PlanError
from .planner import Plan, Task

# A block with fewer elements (all inputs) than this is read and computed on the caller's thread:
# handing its inputs' reads or its sub-chunks to other threads costs more than doing them. Measured
# on the seed's stage 1 in one-row blocks (tiny models): sub-chunks on 2 threads took 30 s, on 1
# thread 11 s; its reads handed to 2 threads as well, 60 s against 38 s read inline.
PARALLEL_MIN_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Read:
    """One block: rows [r0, r1) of every input of task `task` (its index in plan.tasks)."""

    task: int
    r0: int
    r1: int
    hash: bool  # the read of the apply pass: each input row is read once here, and hashed
    cost: int  # bytes the block holds while it is computed, on the device it computes on


@dataclass(frozen=True)
class Step:
    """A block and the passes that run over it, in order (pass == stat_passes is the apply pass)."""

    read: Read
    passes: tuple[int, ...]


@dataclass(frozen=True)
class TaskSchedule:
    task: int
    sub: int  # rows of a compute sub-chunk
    threads: int  # compute threads taking the sub-chunks (runner.Workers)
    stat_passes: int
    whole: bool  # one block: read once, every pass over it
    hold: bool  # the op keeps per-element state from its statistics passes for the apply pass
    steps: tuple[Step, ...]
    block_inputs: int  # bytes of the largest block's inputs, as the arena holds them
    block_other: int  # bytes a block holds beside its inputs (kernel temporaries, kept masks)


@dataclass(frozen=True)
class Schedule:
    """Every task's steps, in the order the run takes them, and the reader's memory."""

    tasks: tuple[TaskSchedule, ...]
    capacity: int  # bytes of blocks the reader may hold ahead of the runner (the current one counts)
    device: str

    def reads(self) -> list[Read]:
        return [s.read for t in self.tasks for s in t.steps]

    def statistics_only(self) -> list[tuple[int, ...]]:
        """Beside reads(): the passes each block is read for where all are statistics passes (ops
        may turn out not to need them, MergeOp.needs_pass: the block is then not read), else ()."""
        return [s.passes if s.passes[-1] < t.stat_passes else () for t in self.tasks for s in t.steps]

    def only(self, todo: list[int]) -> Schedule:
        """The schedule of tasks `todo` (indices into plan.tasks), in that order."""
        by_task = {t.task: t for t in self.tasks}
        return Schedule(tuple(by_task[ti] for ti in todo), self.capacity, self.device)

    @property
    def arena(self) -> int:
        """Bytes of the buffer blocks are carved from. On the CPU: the chunk budget less what else a
        block holds beside its inputs, so a full arena still keeps the budget. On a GPU: one block
        staged at a time."""
        widest = max((t.block_inputs for t in self.tasks), default=0)
        if self.device != "cpu":
            return widest
        return max(self.capacity - max((t.block_other for t in self.tasks), default=0), widest)


def spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) cut into pieces of `step`."""
    return [(r, min(stop, r + step)) for r in range(start, stop, step)]


def pass_steps(blocks: list[tuple[int, int]], passes: int,
               any_order: bool) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """Each block read and the passes (statistics passes, then the apply pass `passes`) run over it
    before the next is read. One block: read once, every pass over it. Several: each pass takes
    them all, the apply pass in row order (its reads feed the input hashes and the output's rows);
    with `any_order` (Cost.any_order) the passes before it alternate direction, backwards first,
    so each pass's last block is the next pass's first and is read once for both.

        >>> pass_steps([(0, 2), (2, 4), (4, 5)], 1, True)
        [((4, 5), (0,)), ((2, 4), (0,)), ((0, 2), (0, 1)), ((2, 4), (1,)), ((4, 5), (1,))]
    """
    if len(blocks) == 1:
        return [(blocks[0], tuple(range(passes + 1)))]
    steps: list[tuple[tuple[int, int], tuple[int, ...]]] = []
    for p in range(passes + 1):
        order = blocks[::-1] if any_order and (passes - p) % 2 else blocks
        if steps and steps[-1][0] == order[0]:  # the block the pass before ended with: still held
            steps[-1] = (order[0], steps[-1][1] + (p,))
            order = order[1:]
        steps.extend((b, (p,)) for b in order)
    return steps


def task_schedule(plan: Plan, ti: int, block: int, sub: int, threads: int = 1, staged: bool = False,
                  reserve: int = 0) -> TaskSchedule:
    """Task `ti` read in blocks of `block` rows, computed in sub-chunks of `sub` rows on `threads`
    (`staged`: a GPU's block, staged in host memory with each input 64-byte aligned). The op keeps
    its state between passes when it is read whole, or when that state fits in `reserve` bytes set
    aside beside the blocks."""
    task = plan.tasks[ti]
    passes = 0 if task.copy_exact else task.cost.stat_passes
    blocks = spans(0, task.rows, block)

    def read(r0: int, r1: int, hash_: bool) -> Read:
        return Read(ti, r0, r1, hash_, block_bytes(task, r1 - r0, min(sub, r1 - r0), threads))

    steps = tuple(Step(read(r0, r1, passes in ps), ps)
                  for (r0, r1), ps in pass_steps(blocks, passes, task.cost.any_order))
    block = min(block, task.rows)
    inputs = input_bytes(task, block)
    if staged:  # the raw bytes, each input 64-byte aligned (wider than the block's dtype when the config casts)
        inputs = max(inputs, block * task.cols * sum(itemsize(i.dtype) for i in task.inputs)) + 64 * len(task.inputs)
    whole = len(blocks) == 1
    hold = whole or 0 < held_bytes(task) <= reserve
    return TaskSchedule(ti, sub, threads, passes, whole, hold, steps, inputs,
                        block_bytes(task, block, sub, threads) - input_bytes(task, block))


def run_chunk_budget(plan: Plan, max_memory: int, chunk_bytes: int | None = None,
                     baseline: int | None = None) -> int:
    """The bytes a run's chunk buffers get (make_schedule's budget): `chunk_bytes` where given (at
    least one row of the widest task), else budget.chunk_budget's share of `max_memory` beside
    `baseline` (default: measured now).

    Raises:
        PlanError: as budget.chunk_budget.
    """
    if chunk_bytes is not None:
        loops_for(plan)  # (chunk_budget asks it through baseline_bytes)
        return max(chunk_bytes, widest_row(plan)[0])
    return chunk_budget(plan, max_memory, baseline)


def make_schedule(plan: Plan, max_memory: int, overlap: bool, chunk_bytes: int | None = None,
                  max_gpu_memory: int | None = None, threads: int = 1) -> Schedule:
    """The schedule of every task within `max_memory` bytes for the whole process (or chunk
    buffers of exactly `chunk_bytes`, for tests and benchmarks), its sub-chunks computed on
    `threads` CPU threads.

    Raises:
        PlanError: the budget does not fit one row of the widest task (named, with the smallest
            budget that does); on a GPU, the GPU's budget does not.
    """
    budget = run_chunk_budget(plan, max_memory, chunk_bytes)
    if plan.device == "cpu":
        # what tasks read in several blocks keep between passes is set aside first, beside the blocks
        reserve = hold_reserve(plan.tasks, budget, threads)
        blocks = budget - reserve
        sched = tuple(task_schedule(plan, ti, *chunk_rows(t, blocks, overlap, threads=threads), reserve=reserve)
                      for ti, t in enumerate(plan.tasks))
        # the reader holds AHEAD_BLOCKS of the largest block at most, not the whole budget
        largest = max((s.read.cost for t in sched for s in t.steps), default=0)
        return Schedule(sched, min(blocks, max(1, AHEAD_BLOCKS * largest)), "cpu")
    gpu = _gpu_budget(plan, max_gpu_memory)
    tasks = []
    for ti, t in enumerate(plan.tasks):  # a block is staged whole in host memory, computed whole on the GPU
        block = min(chunk_rows(t, budget)[0], chunk_rows(t, gpu, overlap, whole_blocks=True, narrow=False)[0])
        tasks.append(task_schedule(plan, ti, block, block, staged=True))
    return Schedule(tuple(tasks), gpu, plan.device)


def input_bytes(task: Task, rows: int) -> int:
    """Bytes `rows` rows of every input take in a block, in budget.block_dtype (a GPU's host block
    stages the raw bytes instead: task_schedule takes the larger)."""
    return len(task.inputs) * rows * task.cols * itemsize(block_dtype(task))


def _gpu_budget(plan: Plan, max_gpu_memory: int | None) -> int:
    free, _total = torch.cuda.mem_get_info(torch.device(plan.device))
    budget = max_gpu_memory if max_gpu_memory is not None else int(free * 0.8)
    need = widest_row(plan)[0]
    if budget < need:
        raise PlanError(f"--max-gpu-memory {budget >> 20}MiB is too small for one row of the widest tensor "
                        f"({need >> 20}MiB); give the GPU more, or run on the CPU (--device cpu)")
    return budget

"""The runner: one task and its blocks in, finished output rows out.

Imports schedule, stats, planner, methods, dtypes, errors (and torch). Pure of the output folder, the
journal and the process: given a task, its schedule, a source of blocks (`take`/`done`) and
the method, it yields `(row0, rows)` in row order, cast to the output dtype by the thread that
computed them, on the device the blocks are on. It may run beside the committer on the same
thread, or in another process or on another machine (the committer writes what it yields).

Threads (`Workers`): a block's sub-chunks are independent pieces of work, computed by a few
threads that each run torch on one core and take the next sub-chunk when free. torch's own
threads split every op and meet at a barrier after it, so on a busy machine each thread the
OS takes away stalls the others at every op; here it delays one sub-chunk while the others
go on. Output rows are still yielded in row order, and every kernel's result for a row is the
same whichever thread computed it.
"""

from __future__ import annotations

import collections
import itertools
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

import torch

from .budget import live_pieces
from .dtypes import compute_dtype, torch_dtype
from .errors import PlanError
from .methods import MergeOp, MethodDef
from .planner import Task
from .schedule import PARALLEL_MIN_ELEMENTS, Read, TaskSchedule, spans
from .stats import TensorStats

S = TypeVar("S")
T = TypeVar("T")


class Workers:
    """`n` compute threads, each running torch ops on one core (n == 1: the caller's thread).

    Example:
        >>> with Workers(2) as w:
        ...     squares = list(w.ordered(lambda k: k * k, range(10)))
    """

    def __init__(self, n: int, name: str = "streammerge-kernel") -> None:
        self.n = max(1, n)
        self._pool = ThreadPoolExecutor(self.n, name, initializer=torch.set_num_threads,
                                        initargs=(1,)) if self.n > 1 else None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def each(self, fn: Callable[[S], None], items: Iterable[S], done: Callable[[S], None],
             abort: Callable[[], None], most: int | None = None) -> None:
        """fn(item) for every item, in any order, at most live_pieces(most) of them begun and not ended
        (`most`: the threads the budget holds sub-chunks for; default all); done(item) on the caller's
        thread as each ends."""
        if self._pool is None or most == 1:
            for item in items:
                fn(item)
                done(item)
            return
        ahead = live_pieces(min(self.n, most or self.n))
        futures: dict[Future[None], S] = {}
        # each future puts itself here as it ends: one queue read a sub-chunk, where
        # concurrent.futures.wait(FIRST_COMPLETED) hung a waiter on every live future and took it off again
        # (the calling thread's CPU per sub-chunk, holding Python's lock: 3.8-9.3 us against 7.3-14.3
        # with 4 to 32 sub-chunks live, 2 threads on 2 cores)
        ended: queue.SimpleQueue[Future[None]] = queue.SimpleQueue()
        pool = self._pool

        def submit(item: S) -> None:
            f = pool.submit(fn, item)
            futures[f] = item
            f.add_done_callback(ended.put)

        todo = iter(items)
        try:
            for item in itertools.islice(todo, ahead):
                submit(item)
            while futures:
                f = ended.get()
                f.result()
                done(futures.pop(f))
                for item in itertools.islice(todo, 1):  # the next, if any
                    submit(item)
        finally:
            _settle(futures, abort)

    def ordered(self, fn: Callable[[S], T], items: Iterable[S], abort: Callable[[], None],
                most: int | None = None) -> Iterator[T]:
        """fn(item) for every item, the results in the items' order, at most live_pieces(most) items
        begun and not yet taken (threads go on while one is held up; budget.py counts them for `most`
        threads; default all)."""
        if self._pool is None or most == 1:
            for item in items:
                yield fn(item)
            return
        live = live_pieces(min(self.n, most or self.n))
        pending: collections.deque[Future[T]] = collections.deque()
        todo = iter(items)
        try:
            for item in todo:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= live:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            _settle(pending, abort)


INLINE = Workers(1)


def _settle(futures: Iterable[Future[T]], abort: Callable[[], None]) -> None:
    """Leave no sub-chunk running on a block the caller is about to give back: cancel what has
    not begun, wake threads waiting for a turn that will not come (a sub-chunk failed), wait."""
    left = [f for f in futures if not f.cancel()]
    if any(not f.done() for f in left):
        abort()
        wait(left)


class BlockSource(Protocol):
    """Blocks in the order of the schedule's reads; each handed back with `done` once used,
    `advanced(read, share)` told as each share of its work (a sub-chunk of one pass) is computed,
    and `unneeded(task, p)` once statistics pass p of the task is known not to run (a block only
    such passes run over may then come as None: it was not read)."""

    def take(self) -> tuple[Read, torch.Tensor | list[torch.Tensor] | None]: ...

    def done(self, read: Read) -> None: ...

    def advanced(self, read: Read, share: float) -> None: ...

    def unneeded(self, task: int, p: int) -> None: ...


def run_task(task: Task, sched: TaskSchedule, blocks: BlockSource, method: MethodDef,
             stats: TensorStats | None = None, workers: Workers | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Task `task`'s output rows, as (first row, rows), in order; `stats` records what the merge did;
    `workers` compute sub-chunks (None: the caller's thread)."""
    if task.copy_exact:
        yield from _copy(task, sched, blocks)
    else:
        yield from _merge(task, sched, blocks, method, stats, workers or INLINE)


def _merge(task: Task, sched: TaskSchedule, blocks: BlockSource, method: MethodDef,
           stats: TensorStats | None, workers: Workers) -> Iterator[tuple[int, torch.Tensor]]:
    """Each step's block through its passes: statistics passes observe it (a pass ends with its
    last step's block), the apply pass yields merged rows, sub-chunk by sub-chunk."""
    op = method.make(task.ctx)
    if sched.hold:
        op.hold_state()  # the apply pass sees the very sub-chunks the statistics passes saw
    if stats is not None:
        op.tally = stats.tally
    op.out = torch_dtype(task.out_dtype)
    if not op.parallel:
        workers = INLINE  # in row order
    last = {p: i for i, step in enumerate(sched.steps) for p in step.passes}  # the step each pass ends with
    # statistics passes the op said, once the pass before ended, it does not need (the first: asked at the
    # start, its blocks read all the same)
    unneeded: set[int] = {0} if sched.stat_passes and not op.needs_pass(0) else set()
    for i, step in enumerate(sched.steps):
        read, x = blocks.take()
        _check(read, step.read, task)
        assert isinstance(x, torch.Tensor) or (x is None and unneeded.issuperset(step.passes))
        for p in step.passes:
            yield from _pass(task, sched, op, p, len(step.passes), read, x, blocks, stats, workers, last[p] == i,
                             unneeded)
        del x
        blocks.done(read)


def _pass(task: Task, sched: TaskSchedule, op: MergeOp, p: int, n_passes: int, read: Read,
          x: torch.Tensor | None, blocks: BlockSource, stats: TensorStats | None, workers: Workers,
          ends: bool, unneeded: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """Pass `p` over the block `x` (rows read.r0..read.r1), its sub-chunks on the workers: a
    statistics pass observes them (and `ends` with this block: the pass's last, in whichever
    direction the schedule runs it), the apply pass yields their merged rows in order. A pass in
    `unneeded` only counts its share (x is None where no other pass needed the block); where a
    statistics pass ends, the op is asked, once, whether it needs the next."""
    rows = read.r1 - read.r0
    pieces = spans(0, rows, sched.sub)

    def advanced(ab: tuple[int, int]) -> None:
        blocks.advanced(read, (ab[1] - ab[0]) / rows / n_passes)

    def end() -> None:
        """Pass p has seen every block: the op tells whether it needs the next statistics pass."""
        op.end_pass(p)
        if p + 1 < sched.stat_passes and not op.needs_pass(p + 1):
            unneeded.add(p + 1)
            blocks.unneeded(read.task, p + 1)  # blocks only it runs over are not read

    if p in unneeded:  # the op knows what this pass would find
        for ab in pieces:
            advanced(ab)
        if ends:
            end()
        return
    assert x is not None  # (a block is left unread only for passes the op does not need)
    compute = compute_dtype(task.compute)
    raw = x.dtype == torch.bfloat16 and compute == torch.float32 and op.takes_raw(p, x)

    def inputs(ab: tuple[int, int]) -> torch.Tensor:
        """The sub-chunk's rows of every input in the compute dtype: a narrow block's (bfloat16
        models') converted here, on the thread computing them, while they are in its cache; as read
        where the op's loops widen them as they load them (MergeOp.takes_raw)."""
        xs = x[:, ab[0]:ab[1]]
        return xs if raw or xs.dtype == compute else xs.to(compute)

    if len(pieces) == 1 or x.numel() < PARALLEL_MIN_ELEMENTS:
        workers = INLINE  # too little work to hand out: a thread's wake-up costs more

    if p < sched.stat_passes:
        def observe(ab: tuple[int, int]) -> None:
            op.observe(p, inputs(ab), read.r0 + ab[0])

        workers.each(observe, pieces, advanced, op.abort, sched.threads)
        if ends:
            end()
        return

    out = torch_dtype(task.out_dtype)

    def apply(ab: tuple[int, int]) -> torch.Tensor:
        xs, r0 = inputs(ab), read.r0 + ab[0]
        before = stats.before(xs, r0) if stats is not None else None
        # cast here, on the thread that computed it (on 2 cores the committer's thread, casting every
        # piece, was the slowest stage of a linear merge), where the op's loop did not (MergeOp.out)
        y = op.apply(xs, r0).to(out)
        if stats is not None and before is not None:
            stats.after(before, y)  # the rows as written
        if y.device.type == "cpu" and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            # rows of the block itself (passthrough's, in the inputs' dtype): the arena gives the
            # block's room to the next read once this pass is done, maybe before the writer has
            # written them, so they leave as a copy. (A passthrough at a tight budget with the
            # helper threads wrote other tensors' bytes into up to 195 of 291 tensors before.)
            y = y.clone()
        return y

    # at most sched.threads' sub-chunks at once: the budget may hold them for fewer threads than there are
    for y, ab in zip(workers.ordered(apply, pieces, op.abort, sched.threads), pieces):
        yield read.r0 + ab[0], y
        advanced(ab)


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

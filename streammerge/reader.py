"""Input rows into blocks: what the runner computes on, read as the schedule says.

Imports budget, schedule, planner, overlap, dtypes, errors (and torch, xxhash). `InputReader.load`
reads one block (rows r0..r1 of every input of a task) into the block arena, in
budget.block_dtype (bfloat16 models stay bfloat16: the runner converts each sub-chunk), or
gathers vocabulary rows to the output tokenizer; with a GPU it stages the raw bytes in pinned
memory and converts them on the device. The apply pass's reads feed each input's hasher, so the
manifest records what the merge read; `input_digests` finishes them. The reader knows nothing
of the output folder; it may run on a helper thread (ReadAhead) or in another process.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch
import xxhash

from .budget import READ_STAGING_BYTES, block_dtype
from .dtypes import compute_dtype, itemsize, torch_dtype
from .errors import InputError
from .overlap import ReadAhead, RingArena
from .planner import INPUT_KEY_SEP, Plan, Task
from .schedule import PARALLEL_MIN_ELEMENTS, Read, input_bytes

# input bytes of the next block the kernel is asked to read ahead while one computes (pagecache.py:
# where pages are given back the kernel's own read-ahead is off), shared among its inputs. Measured
# in a 512 MiB cgroup at --max-memory 512MiB, inputs not cached, merge seconds, alternated: the
# 14-model DARE-TIES 6.25-6.66 s (median 6.32) at 128 MiB against 6.53-6.59 at 256 and 6.67-6.92 at
# 32 (2 MiB an input), the same on 7B shapes 18.6-18.8 against 19.7-20.1 at 32, the gradient SLERP
# there 2.43-2.52 against 2.62-2.75; the 2- and 3-input merges of the medium set alike (SLERP 0.99-1.06
# against 1.01-1.05, TIES 1.83-1.86 against 1.81-1.84, DELLA 3.59-3.61 against 3.57-3.62). The pages
# are clean: under the cgroup's limit the kernel reclaims them rather than fail.
PREFETCH_BYTES = 128 << 20
Block = torch.Tensor | list[torch.Tensor]  # merge inputs (n, rows, cols), or a copied tensor's raw rows


class InputReader:
    """Reads blocks of a plan's inputs on `device`, into `arena` (sized by the schedule).

    Example:
        >>> reader = InputReader(plan, torch.device("cpu"), RingArena(schedule.arena))
        >>> x = reader.load(schedule.tasks[0].steps[0].read)
    """

    def __init__(self, plan: Plan, device: torch.device, arena: RingArena,
                 each: Callable[[Callable[[int], None], list[int], Callable[[], None]], None] | None = None,
                 ways: int = 2) -> None:
        """`each(fn, items, abort)`: runs fn over items on other threads, every item at once (one
        thread each, started in the items' order: a thread may wait for an earlier item's piece),
        and returns when all are done, calling abort() if it gives up on items still running: the
        compute threads, idle while the runner waits for its next block, or the read-ahead's own. A
        block's bytes are then read by `ways` of them at once (at most that many items), each
        through its own share of the staging bytes budget.py counts."""
        self.plan, self.device, self.arena = plan, device, arena
        self.each, self.ways = each, ways
        self._stages: list[torch.Tensor] = []
        self._hashers: dict[int, list[xxhash.xxh3_128]] = {}  # per task: each input's bytes, as read
        self._means: dict[str, torch.Tensor] = {}  # padding rows per vocabulary tensor
        self._copy_stream: torch.cuda.Stream | None = None  # host-to-GPU copies

    def load(self, read: Read) -> Block:
        """A block's rows, on the device they compute on."""
        task = self.plan.tasks[read.task]
        hashers = self._task_hashers(read.task) if read.hash else None
        if task.copy_exact:
            assert hashers is not None
            rows: Block = [self.plan.models[i.model].index.read_rows(i.tensor, read.r0, read.r1, hasher=hi)
                    for i, hi in zip(task.inputs, hashers)]
        elif self.device.type != "cuda":
            rows = self._read(task, read.r0, read.r1, hashers)
        else:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            if task.vocab is None:
                rows = self._upload_raw(task, read, hashers, self._copy_stream)
            else:  # rows gathered to another vocabulary are assembled on the host
                rows = upload(self._read(task, read.r0, read.r1, hashers), self._copy_stream)
            self.arena.give_back()  # staged and copied: the host block is free
        if read.hash and task.vocab is None:  # the apply pass: these input rows are not read again
            for inp in task.inputs:
                self.plan.models[inp.model].index.release(inp.tensor, read.r0, read.r1)
        return rows

    def prefetch(self, read: Read) -> None:
        """`read` comes next: the kernel is asked to start reading its first PREFETCH_BYTES (shared
        among its inputs) while this block computes."""
        task = self.plan.tasks[read.task]
        if task.vocab is not None or not task.inputs:
            return
        width = task.cols * max(itemsize(i.dtype) for i in task.inputs)
        rows = max(1, PREFETCH_BYTES // len(task.inputs) // max(1, width))
        for inp in task.inputs:
            self.plan.models[inp.model].index.prefetch(inp.tensor, read.r0, min(read.r1, read.r0 + rows))

    def release(self, read: Read) -> None:
        """The runner is done with `read`'s block: its arena room (on the CPU) is free again."""
        if self.device.type != "cuda" and not self.plan.tasks[read.task].copy_exact:
            self.arena.give_back()

    def input_digests(self, ti: int) -> dict[str, str]:
        """Task `ti`'s inputs' xxh3-128, by "model ref::tensor", once all its blocks are read: rows
        past the output's (--unsafe-truncate-embeddings) are hashed too. Rows gathered to a new
        vocabulary are not the inputs' bytes in order: none for them."""
        task = self.plan.tasks[ti]
        hashers = self._hashers.pop(ti, None) or [xxhash.xxh3_128() for _ in task.inputs]
        digests = {}
        if task.vocab is None:
            self._hash_tails(task, hashers)
            digests = {f"{self.plan.models[i.model].ref}{INPUT_KEY_SEP}{i.tensor}": h.hexdigest()
                       for i, h in zip(task.inputs, hashers)}
        for inp in task.inputs:  # whole tensors: gathered rows, tails, and pages two blocks shared
            self.plan.models[inp.model].index.release(inp.tensor)
        return digests

    def _task_hashers(self, ti: int) -> list[xxhash.xxh3_128]:
        if ti not in self._hashers:
            self._hashers[ti] = [xxhash.xxh3_128() for _ in self.plan.tasks[ti].inputs]
        return self._hashers[ti]

    def _hash_tails(self, task: Task, hashers: list[xxhash.xxh3_128]) -> None:
        """Rows an input has past the output's, in slices of at most 16 MiB."""
        for inp, h in zip(task.inputs, hashers):
            index = self.plan.models[inp.model].index
            ref = index.tensors[inp.tensor]
            step = max(1, (16 << 20) // max(1, ref.row_bytes))
            for r0 in range(task.rows, ref.rows, step):
                index.read_rows(inp.tensor, r0, min(ref.rows, r0 + step), hasher=h)

    def _read(self, task: Task, row0: int, row1: int, hashers: list[xxhash.xxh3_128] | None = None) -> torch.Tensor:
        """Rows [row0, row1) of every input, cast as the config asks, in budget.block_dtype, in the
        arena (its next block; the runner gives it back)."""
        dt = torch_dtype(block_dtype(task))  # (a vocabulary task's: the compute dtype, as _gather fills it)
        shape = (len(task.inputs), row1 - row0, task.cols)
        x = self.arena.take(input_bytes(task, row1 - row0), dt, shape)
        if task.vocab is not None:
            return self._gather(task, row0, row1, x.zero_())

        via = torch_dtype(task.load_dtype) if task.load_dtype is not None else None

        def part(k: int, a: int, b: int, stage: torch.Tensor | None, hasher: xxhash.xxh3_128 | None) -> None:
            """Input k's rows [a, b) into their place in the block (through the config's dtype where it
            is not the input's), their raw bytes fed to `hasher`."""
            inp = task.inputs[k]
            self.plan.models[inp.model].index.read_rows(inp.tensor, a, b, out=x[k, a - row0:b - row0],
                                                        hasher=hasher, stage=stage, via=via)

        if self.each is not None and self.ways > 1 and not self._stages:
            per = READ_STAGING_BYTES // self.ways  # budget.py counts READ_STAGING_BYTES, shared by the ways
            self._stages = [torch.empty(per, dtype=torch.uint8) for _ in range(self.ways)]
        # (one reading thread: its own staging buffer, index.read_rows's default)
        self._spread(task, row0, row1, hashers,
                     lambda k, a, b, t, h: part(k, a, b, self._stages[t] if self._stages else None, h))
        return x

    def _spread(self, task: Task, row0: int, row1: int, hashers: list[xxhash.xxh3_128] | None,
                part: Callable[[int, int, int, int, xxhash.xxh3_128 | None], None]) -> None:
        """Rows [row0, row1) of every input read by `ways` threads at once (self.each), or on this
        thread (way 0) where there is no `each`, one input, or too little to hand out (a thread's
        wake-up would cost more): part(k, a, b, t, hasher) reads input k's rows [a, b) on way t,
        feeding them to `hasher`.

        A near-equal share of the bytes each (inputs in order, each input's rows in order), cut at
        rows: an input may be split between neighbouring threads. Handing out whole inputs instead
        left one thread reading two of three inputs while the other waited (3-model TIES: 0.4 s of
        1.1 s). Each input's bytes are hashed in row order: a thread reads first the piece that
        begins an input its neighbour goes on with, then its whole inputs, and last the piece that
        goes on with its other neighbour's, once that one is read (when hashing at all)."""
        n = len(task.inputs)
        if self.each is None or self.ways < 2 or n < 2 or n * (row1 - row0) * task.cols < PARALLEL_MIN_ELEMENTS:
            for k in range(n):
                part(k, row0, row1, 0, hashers[k] if hashers is not None else None)
            return
        parts = _parts(task, row0, row1, self.ways)
        after: dict[tuple[int, int], threading.Event] = {}  # (input, first row): that piece is read
        failed = threading.Event()  # a read failed, or the block was given up: waiting threads stop

        def run(t: int) -> None:
            pieces = parts[t]
            heads = [pc for pc in pieces if pc[2] < row1 and pc[1] == row0]
            tails = [pc for pc in pieces if pc[1] > row0]
            wholes = [pc for pc in pieces if pc not in heads and pc not in tails]
            try:
                for k, a, b in heads + wholes + tails:
                    if a > row0 and hashers is not None:  # the rows before are another thread's
                        while not after[(k, a)].wait(0.05):
                            if failed.is_set():
                                return
                        if failed.is_set():
                            return
                    part(k, a, b, t, hashers[k] if hashers is not None else None)
                    if b < row1:
                        after[(k, b)].set()
            except BaseException:
                failed.set()
                raise

        for k, _, b in (pc for pieces in parts for pc in pieces):
            if b < row1:
                after[(k, b)] = threading.Event()
        self.each(run, list(range(len(parts))), failed.set)  # given up: no thread waits on

    def _gather(self, task: Task, row0: int, row1: int, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary rows row0..row1 of every input, aligned to the output vocabulary: each input's
        own row for a token it has, the token's default row (the base's, one holder's, or the
        holders' average; zeros if none) otherwise. Contiguous runs are read at once."""
        assert task.vocab is not None
        models = [self.plan.models[i.model].index for i in task.inputs]
        real = len(task.vocab.rows[0])  # rows past the vocabulary are padding
        if row1 > real:
            means = self._pad_means(task)
            x[:, max(0, real - row0):] = means.to(x.dtype).unsqueeze(1)
            row1 = max(row0, min(row1, real))

        def row(k: int, r: int) -> torch.Tensor:
            return models[k].read_rows(task.inputs[k].tensor, r, r + 1)[0].to(x.dtype)

        for k, inp in enumerate(task.inputs):
            rows = task.vocab.rows[k]
            j = row0
            while j < row1:
                r = rows[j]
                if r < 0:
                    j += 1
                    continue
                end = j + 1
                while end < row1 and rows[end] == rows[end - 1] + 1:
                    end += 1
                models[k].read_rows(inp.tensor, r, r + end - j, out=x[k, j - row0:end - row0])
                j = end
        for j, sources in task.vocab.defaults:
            if not row0 <= j < row1:
                continue
            default = torch.zeros(task.cols, dtype=x.dtype)
            for k, r in sources:
                default += row(k, r)
            if sources:
                default /= len(sources)
            for k in range(len(task.inputs)):
                if task.vocab.rows[k][j] < 0:
                    x[k, j - row0] = default
        load = torch_dtype(task.load_dtype) if task.load_dtype is not None else x.dtype
        if load != x.dtype:  # the config's dtype applies to gathered rows too: in place, an input at a time
            for k in range(x.shape[0]):  # (a rounded copy of the whole block beside it is not in the budget)
                x[k].copy_(x[k].to(load))
        return x

    def _pad_means(self, task: Task) -> torch.Tensor:
        """Each input's mean aligned row (pad_to_multiple_of's padding rows), (n_inputs, cols) float64.

        Sums absolute 64-row blocks in order, so the result is the same whatever the chunking."""
        assert task.vocab is not None
        cached = self._means.get(task.name)
        if cached is not None:
            return cached
        real = len(task.vocab.rows[0])
        total = torch.zeros(len(task.inputs), task.cols, dtype=torch.float64)
        for r0 in range(0, real, 64):
            block = torch.empty((len(task.inputs), min(real, r0 + 64) - r0, task.cols), dtype=torch.float32)
            total += self._gather(task, r0, min(real, r0 + 64), block).double().sum(dim=1)
        self._means[task.name] = total / max(1, real)
        return self._means[task.name]

    def _upload_raw(self, task: Task, read: Read, hashers: list[xxhash.xxh3_128] | None,
                    stream: torch.cuda.Stream) -> torch.Tensor:
        """A block on the GPU: each input's raw bytes read (pread) into the pinned arena, copied as
        they are, and converted to the compute dtype there; half the host traffic of converting
        first, and no conversion on the host's reading threads."""
        rows = read.r1 - read.r0
        stage, offsets, sizes = self._stage_raw(task, read, hashers)

        def convert(staged: torch.Tensor) -> torch.Tensor:
            xg = torch.empty((len(task.inputs), rows, task.cols), dtype=compute_dtype(task.compute),
                             device=staged.device)
            for k, inp in enumerate(task.inputs):
                raw = staged[offsets[k]:offsets[k] + sizes[k]].view(torch_dtype(inp.dtype)).view(rows, task.cols)
                if task.load_dtype is not None and task.load_dtype != inp.dtype:
                    raw = raw.to(torch_dtype(task.load_dtype))  # the config's dtype, as on the host
                xg[k].copy_(raw)
            return xg

        return upload(stage, stream, convert)

    def _stage_raw(self, task: Task, read: Read,
                   hashers: list[xxhash.xxh3_128] | None) -> tuple[torch.Tensor, list[int], list[int]]:
        """The block's raw bytes in the arena (uint8), each input's at a 64-byte aligned offset: (the
        bytes, each input's offset, each input's size). Read by the reading threads as _read's
        blocks are: a GPU merge read every block on the read-ahead thread alone, whatever the cores."""
        rows = read.r1 - read.r0
        sizes = [rows * task.cols * itemsize(i.dtype) for i in task.inputs]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + -(-n // 64) * 64)
        stage = self.arena.take(offsets[-1], torch.uint8, (offsets[-1],))
        views = [stage[offsets[k]:offsets[k] + sizes[k]].view(torch_dtype(inp.dtype))
                 for k, inp in enumerate(task.inputs)]

        def raw(k: int, a: int, b: int, _way: int, hasher: xxhash.xxh3_128 | None) -> None:
            inp = task.inputs[k]
            self.plan.models[inp.model].index.pread_rows(
                inp.tensor, a, b, views[k][(a - read.r0) * task.cols:(b - read.r0) * task.cols], hasher)

        self._spread(task, read.r0, read.r1, hashers, raw)
        return stage, offsets, sizes


def _parts(task: Task, row0: int, row1: int, ways: int) -> list[list[tuple[int, int, int]]]:
    """Rows [row0, row1) of every input as `ways` consecutive parts of near-equal raw bytes (the
    inputs in order, each's rows in order), cut at rows: each a list of pieces (input, first row,
    end row), none empty; a part may be empty where there are fewer rows than ways."""
    sizes = [task.cols * itemsize(i.dtype) * (row1 - row0) for i in task.inputs]  # bytes per input
    total = sum(sizes)
    cuts = [(0, row0)]
    for t in range(1, ways):
        left = total * t / ways
        m = 0
        while m < len(sizes) - 1 and left >= sizes[m]:
            left -= sizes[m]
            m += 1
        row = min(row1, row0 + round(left / max(1, sizes[m]) * (row1 - row0)))
        cuts.append(max(cuts[-1], (m, row)))
    cuts.append((len(sizes) - 1, row1))
    parts = []
    for (m0, r0), (m1, r1) in zip(cuts, cuts[1:]):
        pieces = [(k, r0 if k == m0 else row0, r1 if k == m1 else row1) for k in range(m0, m1 + 1)]
        parts.append([pc for pc in pieces if pc[1] < pc[2]])
    return parts


class ReadBlocks:
    """The runner's source of blocks: a read-ahead over the reader, each block released when done.

    Example:
        >>> blocks = ReadBlocks(reader, schedule.reads(), capacity, threaded=True)
        >>> read, x = blocks.take(); ...; blocks.done(read)
    """

    def __init__(self, reader: InputReader, reads: list[Read], capacity: int, threaded: bool,
                 on_read: Callable[[int], None] | None = None,
                 statistics_only: list[tuple[int, ...]] | None = None) -> None:
        """`on_read(nbytes)` hears of each block's input bytes as the runner works through them (a
        share per sub-chunk and pass), so progress moves inside a large block too.
        `statistics_only` (Schedule.statistics_only) names, beside each read, the statistics passes
        that alone run over its block: once the runner said none of them is needed (`unneeded`),
        it is not read (None in its place), whether read in turn or ahead."""
        self.reader = reader
        self.on_read = on_read
        self._reads = reads
        self._stat_only = statistics_only or [()] * len(reads)
        self._unneeded: set[tuple[int, int]] = set()  # (task, statistics pass) the runner will not run

        def load(at: tuple[int, Read]) -> Block | None:  # reads are loaded one at a time, in order
            passes = self._stat_only[at[0]]
            block = None if passes and all((at[1].task, p) in self._unneeded for p in passes) else reader.load(at[1])
            self._prefetch_after(at[0])
            return block

        self._ahead: ReadAhead[tuple[int, Read], Block | None] = ReadAhead(
            list(enumerate(reads)), load, lambda at: at[1].cost, capacity, threaded)
        self._counted: dict[Read, float] = {}  # bytes of a block reported so far, as a float share
        # each block taken and not yet done (in the order taken): its place in the reads, and whether it was read
        self._taken: deque[tuple[tuple[int, Read], bool]] = deque()

    def _prefetch_after(self, at: int) -> None:
        """The kernel starts reading the read after the `at`-th while that one computes."""
        if at + 1 < len(self._reads):
            self.reader.prefetch(self._reads[at + 1])

    def take(self) -> tuple[Read, Block | None]:
        """The next block; None where only statistics passes the runner said it will not run
        (`unneeded`) run over it: it was not read."""
        spec, block = self._ahead.take()
        self._taken.append((spec, block is not None))
        return spec[1], block

    def unneeded(self, task: int, p: int) -> None:
        """Statistics pass `p` of task `task` (its index in plan.tasks) will not run: a block only
        such passes run over is not read. Said before the runner is done with the block it learnt
        it from: blocks read in turn are all skipped, and a read-ahead, held back by its capacity,
        mostly learns it in time."""
        self._unneeded.add((task, p))

    def advanced(self, read: Read, share: float) -> None:
        if self.on_read is None:
            return
        total = raw_bytes(self.reader.plan.tasks[read.task], read)
        before = self._counted.get(read, 0.0)
        now = min(float(total), before + share * total)
        self._counted[read] = now
        if int(now) > int(before):
            self.on_read(int(now) - int(before))

    def done(self, read: Read) -> None:
        counted = self._counted.pop(read, 0.0)
        total = raw_bytes(self.reader.plan.tasks[read.task], read)
        if self.on_read is not None and int(counted) < total:
            self.on_read(total - int(counted))  # rounding: a block counts its bytes exactly once in all
        spec, loaded = self._taken.popleft()  # blocks are done in the order they are taken
        self._ahead.done(spec)
        if loaded:
            self.reader.release(read)

    def close(self) -> None:
        """Stop reading ahead; a read waiting for arena room gives up; then, the reading thread
        joined, a pinned arena is unpinned."""
        self.reader.arena.close()
        self._ahead.close()
        self.reader.arena.unpin()


def raw_bytes(task: Task, read: Read) -> int:
    """Input bytes a read takes from disk: its rows of every input, in each input's own dtype."""
    return (read.r1 - read.r0) * task.cols * sum(itemsize(i.dtype) for i in task.inputs)


def check_inputs_unchanged(plan: Plan) -> None:
    """Inputs that changed while the merge read them (size, time or header) leave the run unfinished:
    nothing is finalised, and the next run redoes the tensors made from them.

    Raises:
        InputError: naming the model that changed.
    """
    for m in plan.models:
        try:
            now = m.index.identity_hash()
        except OSError as e:
            raise InputError(f"model {m.ref}: its files changed during the merge ({e}); nothing was "
                             "finalised: run the same command again once the inputs are stable") from None
        if now != m.identity:
            raise InputError(f"model {m.ref}: its files in {m.folder} changed during the merge (size, time or "
                             "header); nothing was finalised: run the same command again once the inputs are "
                             "stable, and the tensors made from them are merged again")


def upload(x: torch.Tensor, stream: torch.cuda.Stream,
           convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """x on the GPU, copied from pinned memory on `stream` (then `convert`ed there, on the same
    stream); returns once all is done, so the caller may drop x and the result is safe to use
    on any stream."""
    if not x.is_pinned():
        x = x.pin_memory()
    with torch.cuda.stream(stream):
        xg = x.to(stream.device, non_blocking=True)
        if convert is not None:
            xg = convert(xg)
    stream.synchronize()
    xg.record_stream(torch.cuda.current_stream(stream.device))
    return xg

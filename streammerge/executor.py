"""Run a Plan into an output folder: the folder's policy, then reader → runner → committer.

Imports folder, schedule, reader, runner, committer, output, journal, overlap, budget, options, limits
(and torch, psutil). The schedule is made first (a budget too small fails before OUT is
touched); the folder decides whether to start, resume, skip or refuse; tensors an earlier run
journaled are kept. Then, in output-file order, the reader loads each task's blocks (on a
helper thread with overlap), the runner turns them into rows, and the committer writes, hashes,
syncs and journals them (on the write-behind thread with overlap). Once every tensor is on
disk and the inputs are unchanged, output.finalize writes the manifest and the loader files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import psutil
import torch

from . import pagecache
from .budget import (
    WRITE_BEHIND_BYTES,
    baseline_bytes,
    choose_loops,
    default_max_memory,
    expected_peak,
    loops_for,
)
from .committer import Committer
from .errors import PlanError
from .folder import OutputFolder
from .journal import Entry, Journal, crash_point
from .limits import cgroup_cpus, memory_limit
from .methods import fused
from .options import RunOptions
from .output import content_hash, finalize, manifest_field
from .overlap import RingArena, WriteBehind
from .planner import Plan
from .progress import Progress, Totals
from .reader import InputReader, ReadBlocks, check_inputs_unchanged, raw_bytes
from .runner import Workers, run_task
from .schedule import Read, Schedule, make_schedule, run_chunk_budget
from .stats import TensorStats

__all__ = ["Executor", "Progress", "RunStats", "peak_rss", "resolve_device", "start_cuda"]

# Fewer cores than this: no helper threads by default, but for methods that read more than they
# compute (MethodDef.io_bound). Measured on 2 cores (14-model DARE-TIES): kernels on 2 threads beside
# a reading thread ran 27% slower than everything in turn, since a kernel's threads wait at every
# barrier for the one the reader displaced. Measured again with the runner's workers (medium set,
# 512 MiB, 2 cores, interleaved, merge-time medians of 5-6 runs): a read-ahead and a writer beside
# one compute thread made the 3-model DELLA 39% slower (7.9 s against 5.7), TIES and DARE-TIES even
# (2.8 against 2.7 s, 10.9 against 10.9), and the light methods faster, quiet and beside 4 busy
# processes: the gradient SLERP 1.60 against 1.80 s quiet, 3.85 against 4.20 busy; linear 1.60
# against 1.70 and 3.75 against 4.15; task arithmetic 1.60 against 2.00 and 4.00 against 4.10;
# passthrough even (0.8 s). Helper threads beside 2 compute threads (4 rounds) lost to no helpers
# for every method tried: DELLA 5.15 against 4.85 s, DARE-TIES 10.25 against 9.40, TIES 3.30
# against 3.10, SLERP 1.90 against 1.70 (its default now).
OVERLAP_MIN_CORES = 4
# With a read-ahead, one thread reading every block was the merge's limit past a few cores. Measured
# on 2 cores (medium set, 512 MiB, warm page cache, per-thread CPU time), the 15-model DARE-TIES with
# the read-ahead on and 4 compute threads: reading 4.9-5.4 s of CPU, the compute threads 16.0 s, the
# main thread 4.1-4.3 s (1.5-2 s of it imports): its merge could not go below ~5 s however many
# cores computed (13 s on one). Reading takes about a quarter of its CPU, so a quarter of the cores
# read: 2 threads on 8 cores, 4 on 16 (the read-ahead thread waits while they read; the compute
# threads keep every core but one, and readers run only while there is room ahead, so neither waits
# for the other's share). With 3 of them (tools/thread_cpu.py, after the budget's sampled-row count
# and the cached pages' advice were fixed): 3.1-3.3 s of reading between them and 0.9-1.0 s on the
# read-ahead thread, against 3.1-3.2 s on the read-ahead thread alone. Not yet measured on a machine
# with that many cores.
READ_PER_CORES = 4
READ_THREADS_MAX = 8


@dataclass(frozen=True)
class RunStats:
    """What a run did, for the summary line."""

    seconds: float
    tensors: int
    resumed: int  # tensors kept from an earlier, interrupted run
    bytes_written: int
    peak_rss: int
    manifest_hash: str
    up_to_date: bool = False  # OUT already held this exact merge; nothing was done
    output_bytes: int = 0  # the output's tensor bytes
    shards: int = 0
    content_hash: str = ""  # output.content_hash: the weights' identity, wherever inputs and output lie


def cores() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (a
    container given 2 CPUs on a 16-core host has 2, though os.cpu_count() says 16)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(n, quota)) if quota is not None else n


def default_overlap(plan: Plan, available: int) -> bool:
    """Whether a run reads ahead and writes behind on helper threads when not told (--overlap):
    with OVERLAP_MIN_CORES or more, or on a CPU with 2 or more for a method that reads more than it
    computes (its one compute thread then keeps up with the reading)."""
    if available >= OVERLAP_MIN_CORES:
        return True
    return available > 1 and plan.device == "cpu" and plan.method.io_bound


def read_threads(available: int) -> int:
    """Threads that read each block ahead (with a read-ahead thread: OVERLAP_MIN_CORES or more) on
    `available` cores: one per READ_PER_CORES, at least one, at most READ_THREADS_MAX."""
    return max(1, min(READ_THREADS_MAX, available // READ_PER_CORES))


# Compute threads a run takes when -j is not given, at most (THREADS_MAX; IO_BOUND_THREADS_MAX for
# the methods that read more than they compute, MethodDef.io_bound). Past a few threads the merges
# wait on the memory, not on the cores: measured on the lent 16-core machine (an H200's host, a VM;
# medium set, warm page cache, 1 GiB budget, one run each, December 4 2026), merge wall seconds at
# 1/2/4/8/16 threads: the 14-model DARE-TIES 14.2/9.7/7.6/8.7/11.5 (at 8 GiB: 4/8/16 threads
# 7.1/7.4/10.8, so not the budget's smaller sub-chunks), the 3-model TIES 5.2/3.8/3.8/4.9/7.5, linear
# 3.0/2.8/3.1/3.4/3.7, the gradient SLERP 2.7/2.6/2.8/3.2/3.8. The DARE-TIES's compute threads took
# 13.3 s of CPU at 4 threads and 21.1 s at 16 for the same work; one core there streamed torch's add
# at 0.59 ns per float32 element and 16 at 0.098, 6x (this 2-core machine's one: 0.17).
THREADS_MAX = 4
IO_BOUND_THREADS_MAX = 2


def default_threads(available: int, torch_threads: int) -> int:
    """Compute threads when -j is not given: the cores this process may use (affinity and cgroup
    quota, not os.cpu_count()), at most torch's own count (physical cores) and THREADS_MAX (a run
    of a method that reads more than it computes takes fewer: compute_threads). The runner's threads
    each take whole sub-chunks, so a thread the OS takes away delays its own sub-chunk only, and
    on a busy machine more threads get a larger share of the cores. Measured on 2 cores beside 4
    spinning processes, the 14-model DARE-TIES on the medium set: 2 threads 72.8 s, 1 thread
    114.2 s; quiet 29.2 s and 42.3 s. (torch's own threads, which meet after every op, made 2
    threads 14x slower than 1 on a busy machine: 490 s against 35 s for a 3-model TIES.)"""
    return max(1, min(torch_threads, available, THREADS_MAX))


def threads_cap(io_bound: bool) -> int:
    """The most compute threads a run takes without -j: THREADS_MAX, or IO_BOUND_THREADS_MAX for a
    method that reads more than it computes."""
    return IO_BOUND_THREADS_MAX if io_bound else THREADS_MAX


def reader_core(torch_threads: int, available: int, overlap: bool) -> bool:
    """Whether the compute threads leave a core to the read-ahead: reading ahead with torch's threads
    on every core (the writer's work is light)."""
    return overlap and torch_threads >= available > 1


def compute_threads(torch_threads: int, available: int, overlap: bool, io_bound: bool, asked: bool) -> int:
    """A CPU run's compute threads: torch's thread count (-j when `asked`, else api's default), less
    a core for the reader when reading ahead on every core (reader_core), and without -j at most
    threads_cap(io_bound)."""
    threads = available - 1 if reader_core(torch_threads, available, overlap) else torch_threads
    if not asked:
        threads = min(threads, threads_cap(io_bound))
    return max(1, threads)


@dataclass(frozen=True)
class Threads:
    """The threads a run takes here (Executor's choice; `streammerge plan` shows it)."""

    compute: int  # compute threads (compute_threads; one on a GPU)
    cores: int  # the cores this process may use (cores())
    read_ahead: bool  # a read-ahead and a write-behind thread (default_overlap, or --overlap)
    reading: int  # threads reading each block with the read-ahead (read_threads), else 0
    reader_core: bool  # one core left to the read-ahead (reader_core)
    cap: int  # the most compute threads without -j (threads_cap)


def planned_threads(plan: Plan, options: RunOptions) -> Threads:
    """The threads a run of `plan` with `options` takes on this machine: -j, or torch's count as the
    API sets it (default_threads), through compute_threads; the read-ahead as --overlap says or
    default_overlap decides."""
    available = cores()
    overlap = options.overlap if options.overlap is not None else default_overlap(plan, available)
    reading = read_threads(available) if overlap else 0
    cap = threads_cap(plan.method.io_bound)
    if plan.device != "cpu":
        return Threads(1, available, overlap, reading, False, cap)
    torch_threads = options.num_threads or default_threads(available, torch.get_num_threads())
    compute = compute_threads(torch_threads, available, overlap, plan.method.io_bound, bool(options.num_threads))
    return Threads(compute, available, overlap, reading, reader_core(torch_threads, available, overlap), cap)


# The kernel's read-ahead keeps up to two windows of each file it reads in order (the one being
# read and the one started ahead of it), charged to the merge's memory cgroup before it reads them.
READAHEAD_WINDOWS = 2


def readahead_fits(plan: Plan, held: int, limit: int | None = None) -> bool:
    """Whether the memory the process may use (`limit`; default memory_limit()) leaves room beside
    `held` (what the merge holds: expected_hold) for the kernel's read-ahead of every input model:
    READAHEAD_WINDOWS windows of its device's (pagecache.kernel_readahead says why it matters)."""
    if limit is None:
        limit = memory_limit()
    room = 0
    for m in plan.models:
        shard = next((ref.shard for ref in m.index.tensors.values()), None)
        if shard is not None:
            room += READAHEAD_WINDOWS * pagecache.readahead_bytes(shard)
    return limit - held >= room


def expected_hold(plan: Plan, max_memory: int, chunk_bytes: int | None = None, overlap: bool = True,
                  threads: int = 1) -> int:
    """The memory a run of `plan` is expected to hold at most (budget.expected_peak, within
    `max_memory`, its chunk buffers as make_schedule sizes them: run_chunk_budget): what
    the kernel's read-ahead windows must fit beside (readahead_fits), not the budget. A merge that
    keeps well under its budget leaves them room in a cgroup as tight as the budget: the 3-model
    linear merge at 512 MiB (peak RSS 330-350 MiB, expected 428) read its cold inputs in
    0.74-0.83 s with the kernel's read-ahead, against 0.94-1.06 s without."""
    base = baseline_bytes(plan)
    chunks = run_chunk_budget(plan, max_memory, chunk_bytes, base)
    return min(max_memory, expected_peak(plan, chunks, base, overlap, threads))


def resolve_device(name: str) -> str:
    """The device a run's kernels use: "cpu", "cuda", "cuda:N"; "auto" is cuda when a GPU is visible.

    Raises:
        PlanError: a GPU was asked for and torch sees none (or not that one).
    """
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise PlanError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ''}); run with --device cpu, "
                            "or install a CUDA build of torch on a machine with a GPU")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise PlanError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s), numbered from 0")
        return name
    raise PlanError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or auto")


def peak_rss() -> int:
    """The process's peak resident memory (the kernel's high-water mark where it keeps one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.Process().memory_info().rss)


class Committed(Protocol):
    """What finalisation needs of a run's writer: each tensor's journal entry and each shard's hash."""

    entries: dict[str, Entry]
    shard_hashes: dict[str, str]


class Executor:
    """Runs one plan into one output folder.

    Example:
        >>> stats = Executor(make_plan(cfg), "merged", RunOptions(max_memory="2GiB")).run()
    """

    def __init__(self, plan: Plan, out_dir: str, options: RunOptions | None = None, progress: Progress | None = None,
                 replace_changed: bool = False, stage: str | None = None) -> None:
        """Args:
            options: the run's options (only those about running are read here; the plan has the rest).
            replace_changed: replace a finished output made from another plan (a pipeline's own stages).
            stage: a pipeline stage's label, recorded in the manifest (which pipeline's folder this is).
        """
        self.plan, self.out_dir = plan, out_dir
        self.options = (options or RunOptions()).resolved()
        self.progress = progress or Progress()
        self.stage = stage
        self.overlap = self.options.overlap if self.options.overlap is not None else default_overlap(plan, cores())
        self.device = torch.device(plan.device)  # the plan was made for it: fingerprints say where
        self.max_memory = 0  # the whole process's budget, fixed when the run starts
        self.threads = 1  # compute threads (runner.Workers), fixed when the run starts
        opts = self.options
        self.folder = OutputFolder(out_dir, plan, opts.overwrite, opts.restart, replace_changed, opts.copy_tokenizer,
                                   opts.write_card)

    def run(self) -> RunStats:
        start = time.monotonic()
        plan, opts = self.plan, self.options
        if self.device.type == "cuda":
            start_cuda(self.device)  # its context and libraries count in the baseline the budget is left from
        self.max_memory = opts.memory_bytes or default_max_memory()
        self.plan = plan = choose_loops(plan, self.max_memory)
        if plan.loops_declined:
            self.progress.note(f"kernels: {plan.loops_declined}")
        self.threads = self._threads()
        if loops_for(plan) and not fused.ready(plan.method.jit_loops):
            self.progress.note("compiling the merge's loops with numba, once for this install (10-60 s; later runs "
                               "load them from numba's cache)")
        schedule = self._schedule()  # a budget too small fails before OUT is touched
        pagecache.kernel_readahead(readahead_fits(plan, expected_hold(plan, self.max_memory, self.options.chunk_bytes,
                                                                     self.overlap, self.threads)))
        if self.folder.up_to_date(self.progress.note):
            return RunStats(time.monotonic() - start, len(plan.tasks), 0, 0, peak_rss(), "", True, plan.total_bytes,
                            len(plan.shards), str(manifest_field(self.out_dir, "content_xxh3_128") or ""))
        lock = self.folder.prepare()
        try:
            self.folder.check_disk_space()
            summary = {"config": plan.config.text, "seed": plan.seed}
            journal = Journal(self.out_dir, plan.fingerprint, plan.layout_fingerprint, summary)
            torch_threads = torch.get_num_threads()
            if self.device.type == "cpu":
                # torch's own threads meet at a barrier after every op, spinning while they wait: beside
                # other programs each one the OS takes away stalls the rest (old measurement: 3-model
                # TIES beside 4 busy processes on 2 cores took 490 s on 2 torch threads, 35 s on one).
                # Kernels (and the casts of their rows) run on the runner's workers, each
                # single-threaded; this thread reads and writes on one too.
                torch.set_num_threads(1)
            try:
                kept, written, committer = self._run_tasks(journal, schedule)
            finally:
                torch.set_num_threads(torch_threads)
                journal.close()
                for m in plan.models:
                    m.index.close()
            crash_point("tasks-done")
            check_inputs_unchanged(plan)
            manifest_hash = finalize(plan, self.out_dir, committer.entries, committer.shard_hashes,
                                     opts.copy_tokenizer, opts.write_card, self.stage)
            self.folder.remove_work()
            crash_point("finished")
        finally:
            lock.release()
        return RunStats(time.monotonic() - start, len(plan.tasks), kept, written, peak_rss(), manifest_hash, False,
                        plan.total_bytes, len(plan.shards), content_hash(plan, committer.shard_hashes))

    def _threads(self) -> int:
        """Compute threads (compute_threads); one on a GPU, whose kernels are queued, not computed here."""
        if self.device.type != "cpu":
            return 1
        return compute_threads(torch.get_num_threads(), cores(), self.overlap, self.plan.method.io_bound,
                               bool(self.options.num_threads))

    def _schedule(self) -> Schedule:
        opts = self.options
        return make_schedule(self.plan, self.max_memory, self.overlap, opts.chunk_bytes, opts.gpu_bytes, self.threads)

    def _todo(self, journal: Journal) -> tuple[list[int], dict[int, Entry]]:
        """Tasks still to merge, in output-file order, and the journal entries of those an earlier run
        finished (said), asked of the journal once, before this run appends to it."""
        tasks = self.plan.tasks
        damaged = self.folder.check_kept(journal)
        entries = {ti: journal.done(t.name, t.fingerprint) for ti, t in enumerate(tasks)}
        done = {ti: e for ti, e in entries.items() if e is not None}
        kept = len(done)
        if damaged:
            self.progress.note(f"{len(damaged)} tensor(s) an earlier run journaled no longer match their bytes "
                               f"on disk (e.g. {damaged[0]}); they are merged again")
        if journal.resumed:
            changed = sum(1 for ti, t in enumerate(tasks) if t.name in journal.entries and ti not in done)
            self.progress.note(f"resuming an interrupted run: {kept} of {len(tasks)} tensors already done"
                               + (f", {changed} changed since and recomputed" if changed else "")
                               + f", {len(tasks) - kept - changed} still to do")
        todo = [ti for shard in self.plan.shards for ti in shard.tasks if ti not in done]
        return todo, done

    def _start_progress(self, reads: list[Read], done: dict[int, Entry]) -> None:
        """Tell the progress what lies ahead: `reads` to do, `done` kept from an earlier run."""
        tasks = self.plan.tasks
        self.progress.start(Totals(len(tasks), self.plan.total_bytes, sum(raw_bytes(tasks[r.task], r) for r in reads),
                                   len(done), sum(tasks[ti].nbytes for ti in done), self.max_memory))

    def _run_tasks(self, journal: Journal, schedule: Schedule) -> tuple[int, int, Committed]:
        plan = self.plan
        todo, done = self._todo(journal)
        sched = schedule.only(todo)
        reads = sched.reads()
        self._start_progress(reads, done)
        steps = {t.task: t for t in sched.tasks}
        workers = Workers(self.threads)
        # Without a read-ahead thread the compute threads wait for each block: they read it. With
        # one, it reads each block on threads of its own (READ_PER_CORES), on a GPU too: the host
        # stages each block's raw bytes for it.
        readers = Workers(read_threads(cores()), "streammerge-reader") if self.overlap else workers
        each = (lambda fn, items, abort: readers.each(fn, items, _nothing, abort)) if readers.n > 1 else None
        reader = InputReader(plan, self.device, RingArena(sched.arena, pin=self.device.type == "cuda"), each,
                             readers.n)
        source = ReadBlocks(reader, reads, sched.capacity, self.overlap, self.progress.read, sched.statistics_only())
        writes = WriteBehind(WRITE_BEHIND_BYTES, self.overlap)
        committer = Committer(self.out_dir, plan, journal, self.progress)
        try:
            for si, shard in enumerate(plan.shards):
                self.folder.unrename(shard.name)
                writes.submit(partial(committer.open_shard, si))
                for ti in shard.tasks:
                    task = plan.tasks[ti]
                    entry = done.get(ti)
                    if entry is not None:
                        writes.submit(partial(committer.keep, task, entry))
                        continue
                    writes.submit(partial(committer.start_task, task))
                    self.progress.tensor(task.name)
                    stats = None if task.copy_exact else TensorStats(len(task.inputs), task.rows, task.ctx.base)
                    for row0, y in run_task(task, steps[ti], source, plan.method, stats, workers):
                        writes.submit(partial(committer.write, task, row0, y), y.nbytes)
                        del y  # the committer holds it now
                    record = stats.record() if stats is not None else None
                    writes.submit(partial(committer.end_task, task, reader.input_digests(ti), record))
                writes.submit(committer.end_shard)
            writes.drain()
        finally:
            workers.close()  # no sub-chunk computes on a block the reader gives back
            readers.close()
            writes.close()
            source.close()  # before the inputs' files are closed
            committer.close()
            self.progress.close()  # after the committer stopped: the count shown is what is journaled
        return len(done), sum(plan.tasks[ti].nbytes for ti in todo), committer


def _nothing(*args: object) -> None:
    pass


def start_cuda(device: torch.device) -> None:
    """Create the GPU context and load the kernels a merge uses, so that the host memory they
    take (hundreds of MiB: the context, the CUDA libraries' pages) is measured before the budget
    is divided: on an H200 a 1 GiB run peaked at 1459 MiB RSS when this came later."""
    x = torch.arange(1024, dtype=torch.int64, device=device)
    y = (x * 3 + 1).bitwise_xor(x >> 2).view(torch.int32)[:1024].float().abs()
    torch.bincount((y > 0).int()).cpu()
    (y.sum(dtype=torch.float64) + torch.sign(y).sum()).item()
    torch.cuda.synchronize(device)

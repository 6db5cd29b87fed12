"""Run a Plan: stream each task's row chunks through its method and into the output shards.

Imports plan, budget, overlap, methods, index, writer, journal, output, dtypes, errors (and
torch, psutil, xxhash). The only module that does both I/O and compute. Tasks run in
output-file order; each reads its inputs in blocks of rows as large as the budget allows (the
whole tensor when it fits, read once for every pass), runs its statistics passes and then the
apply pass over cache-sized sub-chunks of each block, and casts each result to the output
dtype, handing its bytes to the writer while a streaming xxh3-128 hasher sees them. The pass
that reads every input row once also hashes the input bytes. Journaled tensors are skipped on
a rerun.

Three threads share the work, each in a fixed order (overlap.py): a reader loads the next
blocks (every read of the run is known before it starts) within the budget, the caller
computes, and a writer casts, writes, hashes, syncs and journals finished rows in order. With
`--device cuda` the reader also uploads each block, kernels run on the GPU, and the writer
downloads finished rows.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import psutil
import torch
import xxhash

from .budget import WRITE_BEHIND_BYTES, block_bytes, chunk_budget, chunk_rows, widest_row
from .config import ConfigWarning
from .dtypes import compute_dtype, itemsize, torch_dtype
from .errors import InputError, OutputError, PlanError
from .journal import JOURNAL_FILE, PLAN_FILE, WORK_DIR, Entry, Journal, RunLock, crash_point
from .output import (
    FILES_RECORD,
    INDEX,
    INPUT_KEY_SEP,
    MANIFEST,
    finalize,
    finished_output,
    manifest_field,
    output_files,
    owned_files,
    recorded_files,
)
from .overlap import ReadAhead, RingArena, WriteBehind
from .planner import Plan, Task
from .writer import PARTIAL, ShardWriter

HASH_READ_BYTES = 64 << 20  # re-hashing journaled tensors on resume reads this much at a time
# Finished tensors are synced and journaled together once this many bytes wait (and at each
# shard's end): an fdatasync per tensor cost 5% of a 3-model TIES here, more on slow disks.
GROUP_COMMIT_BYTES = 64 << 20
# Fewer cores than this: no helper threads by default. Measured on 2 cores (14-model DARE-TIES):
# kernels on 2 threads beside a reading thread ran 27% slower than everything in turn, since a
# kernel's threads wait at every barrier for the one the reader displaced.
OVERLAP_MIN_CORES = 4


@dataclass(frozen=True)
class ReadSpec:
    """One block to read: rows [r0, r1) of every input of a task, for `passes` of it."""

    task: int  # index into plan.tasks
    r0: int
    r1: int
    hash: bool  # the pass that reads each input row once: feed the input hashers
    cost: int  # bytes the block holds, on the device it computes on


@dataclass
class _TaskOut:
    """A task's output as the writer thread sees it."""

    task: Task
    offset: int
    hasher: xxhash.xxh3_128


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


class Progress:
    """What a run reports as it goes; this base reports nothing. The CLI draws a bar or prints lines."""

    def note(self, msg: str) -> None:
        """A one-off message (resuming, up to date, a stage starting)."""

    def start(self, tensors: int, nbytes: int, done_tensors: int, done_bytes: int) -> None:
        """The work ahead: totals, and what an earlier run already did."""

    def advance(self, name: str, nbytes: int) -> None:
        """Tensor `name` (nbytes of output) is finished."""

    def close(self) -> None:
        """The run is over."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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


class Executor:
    """Runs one plan into one output folder.

    Example:
        >>> stats = Executor(make_plan(cfg), "merged", max_memory=2 << 30).run()
    """

    def __init__(self, plan: Plan, out_dir: str, max_memory: int, progress: Progress | None = None,
                 overwrite: bool = False, restart: bool = False, chunk_bytes: int | None = None,
                 replace_changed: bool = False, copy_tokenizer: bool = True, write_card: bool = True,
                 overlap: bool | None = None, max_gpu_memory: int | None = None, stage: str | None = None) -> None:
        """Args:
            overwrite: replace a finished output, even an identical one.
            restart: discard an unfinished run in OUT instead of resuming it.
            chunk_bytes: the chunk budget itself (tests and benchmarks fix chunking with it).
            replace_changed: replace a finished output made from another plan (a pipeline's own stages).
            overlap: read ahead and write behind on helper threads (False: all in order on one thread;
                None: when there are at least OVERLAP_MIN_CORES cores, since on fewer the helpers
                take a core the kernels' threads wait for).
            max_gpu_memory: bytes of GPU memory blocks may use (default: 80% of what is free).
            stage: a pipeline stage's label, recorded in the manifest (which pipeline's folder this is).
        """
        cores = _cores()
        self.overlap = overlap if overlap is not None else cores >= OVERLAP_MIN_CORES
        self.device = torch.device(plan.device)  # the plan was made for it: fingerprints say where
        self.max_gpu_memory = max_gpu_memory
        self._input_hashers: dict[str, list[xxhash.xxh3_128]] = {}
        self._uncommitted: list[Entry] = []  # written, not yet synced and journaled
        self._uncommitted_bytes = 0
        self._copy_stream: torch.cuda.Stream | None = None  # host-to-GPU copies (the reader's)
        self._arena = RingArena(0)  # the blocks' memory, sized when the run's chunking is known
        self._ours: set[str] = set()  # files in OUT a previous run provably wrote (output.owned_files)
        self._non_finite: set[str] = set()  # tensors already reported holding NaN or Inf
        self.stage = stage
        self.replace_changed = replace_changed
        self.copy_tokenizer, self.write_card = copy_tokenizer, write_card
        self._means: dict[str, torch.Tensor] = {}  # padding rows per vocabulary tensor
        self.plan, self.out_dir = plan, out_dir
        self.max_memory = max_memory
        self.chunk_bytes = chunk_bytes
        self.progress = progress or Progress()
        self.overwrite, self.restart = overwrite, restart

    def run(self) -> RunStats:
        start = time.monotonic()
        if self.device.type == "cuda":
            _start_cuda(self.device)  # its context and libraries count in the baseline the budget is left from
        if self.chunk_bytes is not None:
            budget = max(self.chunk_bytes, widest_row(self.plan)[0])
        else:
            budget = chunk_budget(self.plan, self.max_memory)  # fails before OUT is touched
        if self._up_to_date():
            return RunStats(time.monotonic() - start, len(self.plan.tasks), 0, 0, peak_rss(), "", up_to_date=True)
        lock = self._prepare_output()
        try:
            self._check_disk_space()
            summary = {"config": self.plan.config.text, "seed": self.plan.seed}
            journal = Journal(self.out_dir, self.plan.fingerprint, self.plan.layout_fingerprint, summary)
            threads = torch.get_num_threads()
            if self.overlap and threads >= _cores() > 1:
                torch.set_num_threads(_cores() - 1)  # a core for the reader; the writer's work is light
            try:
                kept, written, entries, shard_hashes = self._run_tasks(journal, budget)
            finally:
                torch.set_num_threads(threads)
                journal.close()
                for m in self.plan.models:
                    m.index.close()
            crash_point("tasks-done")
            self._check_inputs_unchanged()
            manifest_hash = finalize(self.plan, self.out_dir, entries, shard_hashes, self.copy_tokenizer,
                                     self.write_card, self.stage)
            shutil.rmtree(os.path.join(self.out_dir, WORK_DIR))
            crash_point("finished")
        finally:
            lock.release()
        return RunStats(time.monotonic() - start, len(self.plan.tasks), kept, written, peak_rss(), manifest_hash)

    def _run_tasks(self, journal: Journal, budget: int) -> tuple[int, int, dict[str, Entry], dict[str, str]]:
        tasks = self.plan.tasks
        damaged = self._check_kept(journal)
        kept = sum(1 for t in tasks if journal.done(t.name, t.fingerprint))
        if damaged:
            self.progress.note(f"{len(damaged)} tensor(s) an earlier run journaled no longer match their bytes "
                               f"on disk (e.g. {damaged[0]}); they are merged again")
        if journal.resumed:
            changed = sum(1 for t in tasks if t.name in journal.entries and not journal.done(t.name, t.fingerprint))
            self.progress.note(f"resuming an interrupted run: {kept} of {len(tasks)} tensors already done"
                          + (f", {changed} changed since and recomputed" if changed else "")
                          + f", {len(tasks) - kept - changed} still to do")
        entries: dict[str, Entry] = {}
        shard_hashes: dict[str, str] = {}
        kept_bytes = sum(t.nbytes for t in tasks if journal.done(t.name, t.fingerprint))
        self.progress.start(len(tasks), self.plan.total_bytes, kept, kept_bytes)
        todo = [ti for shard in self.plan.shards for ti in shard.tasks
                if journal.done(tasks[ti].name, tasks[ti].fingerprint) is None]
        capacity, rows = self._chunking(todo, budget)
        specs = [spec for ti in todo for spec in self._read_specs(ti, rows[ti])]
        self._arena = RingArena(self._arena_bytes(todo, rows, budget), pin=self.device.type == "cuda")
        reads: ReadAhead[ReadSpec, torch.Tensor | list[torch.Tensor]] = ReadAhead(
            specs, self._load, lambda sp: sp.cost, capacity, self.overlap)
        writes = WriteBehind(WRITE_BEHIND_BYTES, self.overlap)
        writers: list[ShardWriter] = []
        try:
            for shard in self.plan.shards:
                self._unrename(shard.name)
                w = ShardWriter(self.out_dir, shard)
                writers.append(w)
                h = xxhash.xxh3_128(shard.header)
                for ti in shard.tasks:
                    t = tasks[ti]
                    entry = journal.done(t.name, t.fingerprint)
                    if entry is None:
                        self._run_task(t, rows[ti], w, h, reads, writes, journal, entries)
                    else:
                        writes.submit(partial(self._rehash, t, w, h, entry, entries))
                writes.submit(partial(self._commit, w, journal, entries))
                writes.submit(partial(self._end_shard, w, h, shard.name, shard_hashes))
            writes.drain()
        finally:
            writes.close()
            self._arena.close()  # a read waiting for room gives up
            reads.close()  # before the inputs' maps are closed
            for w in writers:
                w.close()
        self.progress.close()
        written = sum(tasks[ti].nbytes for ti in todo)
        return kept, written, entries, shard_hashes

    def _chunking(self, todo: list[int], budget: int) -> tuple[int, dict[int, tuple[int, int]]]:
        """The read-ahead's byte capacity, and per task (block rows, sub-chunk rows)."""
        tasks = self.plan.tasks
        if self.device.type != "cuda":
            return budget, {ti: chunk_rows(self.plan, tasks[ti], budget, self.overlap) for ti in todo}
        gpu = self._gpu_budget()
        rows = {}
        for ti in todo:
            # a block is staged whole in host memory (one at a time) and computed whole on the GPU
            cpu_block = chunk_rows(self.plan, tasks[ti], budget)[0]
            gpu_block = chunk_rows(self.plan, tasks[ti], gpu, self.overlap, whole_blocks=True)[0]
            block = min(cpu_block, gpu_block)
            rows[ti] = (block, block)
        return gpu, rows

    def _arena_bytes(self, todo: list[int], rows: dict[int, tuple[int, int]], budget: int) -> int:
        """Room for the blocks' inputs: the chunk budget less what else a block holds beside them
        (DARE masks, kernel temporaries), so a fully used arena still keeps the budget. On a GPU
        run it stages one block at a time, within the host budget."""
        if self.device.type == "cuda":  # raw bytes are staged, each input 64-byte aligned
            return max((self._x_bytes(self.plan.tasks[ti], rows[ti][0]) + 64 * len(self.plan.tasks[ti].inputs)
                        for ti in todo), default=0)
        other = 0
        for ti in todo:
            t = self.plan.tasks[ti]
            block, sub = rows[ti]
            other = max(other, block_bytes(self.plan, t, block, sub) - self._x_bytes(t, block))
        return max(budget - other, max((self._x_bytes(self.plan.tasks[ti], rows[ti][0]) for ti in todo), default=0))

    @staticmethod
    def _x_bytes(task: Task, rows: int) -> int:
        return len(task.inputs) * rows * task.cols * itemsize(task.compute)

    def _gpu_budget(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        budget = self.max_gpu_memory if self.max_gpu_memory is not None else int(free * 0.8)
        need = widest_row(self.plan)[0]
        if budget < need:
            raise PlanError(f"--max-gpu-memory {budget >> 20}MiB is too small for one row of the widest tensor "
                            f"({need >> 20}MiB); give the GPU more, or run on the CPU (--device cpu)")
        return budget

    def _read_specs(self, ti: int, rows: tuple[int, int]) -> list[ReadSpec]:
        """Every block task `ti` reads, in the order its passes read them."""
        task = self.plan.tasks[ti]
        block, sub = rows
        blocks = _spans(0, task.rows, block)
        self._input_hashers[task.name] = [xxhash.xxh3_128() for _ in task.inputs]

        def spec(r0: int, r1: int, hash_: bool) -> ReadSpec:
            return ReadSpec(ti, r0, r1, hash_, block_bytes(self.plan, task, r1 - r0, min(sub, r1 - r0)))

        if task.copy_exact or len(blocks) == 1:
            return [spec(r0, r1, True) for r0, r1 in blocks]  # one read, for every pass
        passes = self.plan.method.make(task.ctx).stat_passes
        return [spec(r0, r1, p == passes) for p in range(passes + 1) for r0, r1 in blocks]

    def _load(self, spec: ReadSpec) -> torch.Tensor | list[torch.Tensor]:
        """A block's rows, on the device they compute on (the read-ahead thread calls this)."""
        task = self.plan.tasks[spec.task]
        hashers = self._input_hashers[task.name] if spec.hash else None
        if task.copy_exact:
            assert hashers is not None
            return [self.plan.models[i.model].index.read_rows(i.tensor, spec.r0, spec.r1, hasher=hi)
                    for i, hi in zip(task.inputs, hashers)]
        if self.device.type != "cuda":
            return self._read(task, spec.r0, spec.r1, hashers)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        if task.vocab is None:
            xg = self._upload_raw(task, spec, hashers, self._copy_stream)
        else:  # rows gathered to another vocabulary are assembled on the host
            xg = _upload(self._read(task, spec.r0, spec.r1, hashers), self._copy_stream)
        self._arena.give_back()  # staged and copied: the host block is free
        return xg

    def _upload_raw(self, task: Task, spec: ReadSpec, hashers: list[xxhash.xxh3_128] | None,
                    stream: torch.cuda.Stream) -> torch.Tensor:
        """A block on the GPU: each input's raw bytes read (pread) into the pinned arena, copied as
        they are, and converted to the compute dtype there; half the host traffic of converting
        first, and no conversion on the host's one reading thread."""
        rows = spec.r1 - spec.r0
        sizes = [rows * task.cols * itemsize(i.dtype) for i in task.inputs]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + -(-n // 64) * 64)
        stage = self._arena.take(offsets[-1], torch.uint8, (offsets[-1],))
        for k, inp in enumerate(task.inputs):
            part = stage[offsets[k]:offsets[k] + sizes[k]].view(torch_dtype(inp.dtype))
            self.plan.models[inp.model].index.pread_rows(inp.tensor, spec.r0, spec.r1, part,
                                                         hashers[k] if hashers is not None else None)

        def convert(staged: torch.Tensor) -> torch.Tensor:
            xg = torch.empty((len(task.inputs), rows, task.cols), dtype=compute_dtype(task.compute),
                             device=staged.device)
            for k, inp in enumerate(task.inputs):
                raw = staged[offsets[k]:offsets[k] + sizes[k]].view(torch_dtype(inp.dtype)).view(rows, task.cols)
                if task.load_dtype is not None and task.load_dtype != inp.dtype:
                    raw = raw.to(torch_dtype(task.load_dtype))  # the config's dtype, as on the host
                xg[k].copy_(raw)
            return xg

        return _upload(stage, stream, convert)

    def _run_task(self, task: Task, rows: tuple[int, int], w: ShardWriter, shard_hash: xxhash.xxh3_128,
                  reads: ReadAhead[ReadSpec, torch.Tensor | list[torch.Tensor]], writes: WriteBehind,
                  journal: Journal, entries: dict[str, Entry]) -> None:
        """Compute `task` and hand its rows, then its journal entry, to the writer in order."""
        out = _TaskOut(task, task.begin, xxhash.xxh3_128())
        writes.submit(partial(crash_point, "task-start"))
        chunks = self._copy_chunks(task, reads) if task.copy_exact else self._merge_chunks(task, rows, reads)
        for y in chunks:
            writes.submit(partial(self._write_rows, out, y, w, shard_hash), y.nbytes)
            del y  # the writer holds it now
        writes.submit(partial(self._end_task, out, w, journal, entries))

    def _write_rows(self, out: _TaskOut, y: torch.Tensor, w: ShardWriter, shard_hash: xxhash.xxh3_128) -> None:
        """Cast, write and hash one chunk of finished rows (the writer thread)."""
        cast = y.to(torch_dtype(out.task.out_dtype)).cpu()
        if cast.is_floating_point() and out.task.name not in self._non_finite and not bool(torch.isfinite(cast).all()):
            self._non_finite.add(out.task.name)  # said once per tensor; NaN or Inf in the output is never wanted
            row = (out.offset - out.task.begin) // max(1, out.task.nbytes // max(1, out.task.rows))
            warnings.warn(f"tensor {out.task.name!r}: the merged values hold NaN or Inf (from row {row} on); an "
                          "input holds them, or the method divided by zero (`streammerge plan --explain "
                          f"{out.task.name}` lists the inputs)", ConfigWarning, stacklevel=2)
        data = _bytes_of(cast)
        w.write(out.offset, data)
        out.hasher.update(data)
        shard_hash.update(data)
        out.offset += data.nbytes
        crash_point("chunk-written")

    def _hash_tails(self, task: Task, hashers: list[xxhash.xxh3_128]) -> None:
        """Rows an input has past the output's (--unsafe-truncate-embeddings keeps the first rows) are
        hashed too, in slices of at most 16 MiB, so the manifest's input hash is the whole tensor's."""
        for inp, h in zip(task.inputs, hashers):
            index = self.plan.models[inp.model].index
            ref = index.tensors[inp.tensor]
            step = max(1, (16 << 20) // max(1, ref.cols * itemsize(inp.dtype)))
            for r0 in range(task.rows, ref.rows, step):
                index.read_rows(inp.tensor, r0, min(ref.rows, r0 + step), hasher=h)

    def _end_task(self, out: _TaskOut, w: ShardWriter, journal: Journal, entries: dict[str, Entry]) -> None:
        """A tensor is written: its entry waits to be committed with others (the writer thread)."""
        task = out.task
        if out.offset != task.begin + task.nbytes:
            raise RuntimeError(f"internal error: {task.name} wrote {out.offset - task.begin} of {task.nbytes} bytes")
        hashers = self._input_hashers.pop(task.name)
        if task.vocab is None:
            self._hash_tails(task, hashers)
        # rows gathered to a new vocabulary are not the input tensors' bytes in order: no hash for them
        read = {} if task.vocab is not None else {
            f"{self.plan.models[i.model].ref}{INPUT_KEY_SEP}{i.tensor}": hi.hexdigest()
            for i, hi in zip(task.inputs, hashers)}
        self._uncommitted.append(Entry(task.name, task.fingerprint, self.plan.shards[task.shard].name, task.begin,
                                       task.nbytes, out.hasher.hexdigest(), read))
        self._uncommitted_bytes += task.nbytes
        if self._uncommitted_bytes >= GROUP_COMMIT_BYTES:
            self._commit(w, journal, entries)
        self.progress.advance(task.name, task.nbytes)

    def _commit(self, w: ShardWriter, journal: Journal, entries: dict[str, Entry]) -> None:
        """Group commit: the shard's bytes synced once, then the waiting tensors journaled (the
        invariant per tensor is unchanged: its bytes are on disk before its journal line)."""
        if not self._uncommitted:
            return
        w.sync()
        crash_point("tensor-synced")
        journal.append(*self._uncommitted)
        for e in self._uncommitted:
            entries[e.name] = e
        self._uncommitted, self._uncommitted_bytes = [], 0

    def _check_inputs_unchanged(self) -> None:
        """Inputs that changed while the merge read them (size, time or header) leave the run unfinished:
        nothing is finalised, and the next run redoes the tensors made from them."""
        for m in self.plan.models:
            try:
                now = m.index.identity_hash()
            except OSError as e:
                raise InputError(f"model {m.ref}: its files changed during the merge ({e}); nothing was "
                                 "finalised: run the same command again once the inputs are stable") from None
            if now != m.identity:
                raise InputError(f"model {m.ref}: its files in {m.folder} changed during the merge (size, time or "
                                 "header); nothing was finalised: run the same command again once the inputs are "
                                 "stable, and the tensors made from them are merged again")

    def _check_kept(self, journal: Journal) -> list[str]:
        """Journaled tensors are trusted only if their bytes in the shard still hash as journaled: the
        rest are forgotten, so they are merged again. Returns their names."""
        damaged = []
        for shard in self.plan.shards:
            path = os.path.join(self.out_dir, shard.name + PARTIAL)
            if not os.path.exists(path):
                path = os.path.join(self.out_dir, shard.name)  # renamed by a finalisation that was killed
            kept = [self.plan.tasks[ti] for ti in shard.tasks
                    if journal.done(self.plan.tasks[ti].name, self.plan.tasks[ti].fingerprint)]
            if not kept:
                continue
            try:
                with open(path, "rb") as f:
                    for t in kept:
                        h = xxhash.xxh3_128()
                        f.seek(t.begin)
                        for off in range(0, t.nbytes, HASH_READ_BYTES):
                            h.update(f.read(min(HASH_READ_BYTES, t.nbytes - off)))
                        if h.hexdigest() != journal.entries[t.name].xxh3_128:
                            damaged.append(t.name)
            except FileNotFoundError:
                damaged += [t.name for t in kept]
        journal.forget(damaged)
        return damaged

    def _rehash(self, task: Task, w: ShardWriter, shard_hash: xxhash.xxh3_128, entry: Entry,
                entries: dict[str, Entry]) -> None:
        """A tensor journaled by an earlier run: its bytes feed the shard's hash again."""
        for off in range(0, task.nbytes, HASH_READ_BYTES):
            shard_hash.update(w.read(task.begin + off, min(HASH_READ_BYTES, task.nbytes - off)))
        entries[task.name] = entry

    def _end_shard(self, w: ShardWriter, h: xxhash.xxh3_128, name: str, shard_hashes: dict[str, str]) -> None:
        w.sync()
        shard_hashes[name] = h.hexdigest()
        crash_point("shard-synced")
        w.close()

    def _check_disk_space(self) -> None:
        """Refuse before any work when the output's filesystem cannot hold the shards still to write."""
        need = 0
        for shard in self.plan.shards:
            have = 0
            for name in (shard.name + PARTIAL, shard.name):
                path = os.path.join(self.out_dir, name)
                if os.path.exists(path):
                    have = os.stat(path).st_blocks * 512  # allocated, not apparent, size
            need += max(0, shard.size - have)
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise OutputError(f"{self.out_dir}: not enough disk space: the output needs {_gb(need)} more, "
                              f"{_gb(free)} is free; free some space (or choose another folder) and run again")

    def _unrename(self, shard_name: str) -> None:
        """A kill during finalisation may have renamed a shard already; it is still ours to finish."""
        final = os.path.join(self.out_dir, shard_name)
        partial = final + PARTIAL
        if shard_name in self._ours and os.path.exists(final) and not os.path.exists(partial):
            os.replace(final, partial)

    def _up_to_date(self) -> bool:
        if not finished_output(self.out_dir):
            return False
        if manifest_field(self.out_dir, "plan_fingerprint") == self.plan.fingerprint and not self.overwrite:
            broken = [s.name for s in self.plan.shards if not _has_size(os.path.join(self.out_dir, s.name), s.size)]
            files = recorded_files(self.out_dir)
            broken += sorted(files - owned_files(self.out_dir)) if files else []
            if not broken:
                self.progress.note(f"{self.out_dir} already holds this exact merge (plan "
                                   f"{self.plan.fingerprint[:12]}); nothing to do (`streammerge verify` re-hashes it)")
                return True
            self.progress.note(f"{self.out_dir} holds this merge, but {broken[0]} is missing or changed since; "
                               "merging again")
            return False
        if not (self.overwrite or self.replace_changed):
            raise OutputError(f"{self.out_dir} already holds a finished merge ({MANIFEST}) of a different config or "
                              "inputs; pass --overwrite to replace it, or choose another output folder")
        return False

    def _prepare_output(self) -> RunLock:
        out = self.out_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise OutputError(f"{out} exists and is not a folder; choose another output path")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create the output folder ({e.strerror})") from e
        if not os.access(out, os.W_OK):
            raise OutputError(f"{out} is not writable; choose a folder you can write to")
        self._refuse_input_folder()
        work = os.path.join(out, WORK_DIR)
        finished = finished_output(out)
        if not finished and not os.path.isdir(work) and any(not n.startswith(".") for n in os.listdir(out)):
            raise OutputError(f"{out} is not empty and holds no streammerge run; choose an empty or new folder "
                              "(nothing there was changed)")
        lock = RunLock(out)
        try:
            self._ours = owned_files(out)
            # the shard files a loader looks for first must be ours or absent, even where this
            # layout does not write them: a stray model.safetensors would be loaded instead
            will_write = {MANIFEST, "model.safetensors", INDEX, *(s.name for s in self.plan.shards),
                          *output_files(self.plan, out, self.copy_tokenizer, self.write_card)}
            in_the_way = sorted(n for n in will_write if os.path.lexists(os.path.join(out, n)) and n not in self._ours)
            if in_the_way:
                raise OutputError(f"{out} holds {', '.join(in_the_way[:5])}{' ...' if len(in_the_way) > 5 else ''}, "
                                  "which streammerge did not write (or which changed since it did) and would have "
                                  "to replace; move them away or choose another folder (nothing there was changed)")
            if finished or self.restart:
                _remove_outputs(out, self._ours)
                self._ours = set()
        except BaseException:
            lock.release()
            raise
        return lock

    def _refuse_input_folder(self) -> None:
        here = os.path.realpath(self.out_dir)
        for m in self.plan.models:
            if os.path.realpath(m.folder) == here:
                raise OutputError(f"{self.out_dir} is the folder of the input model {m.ref}; streammerge never "
                                  "writes into an input's folder: choose another output folder")

    def _read(self, task: Task, row0: int, row1: int, hashers: list[xxhash.xxh3_128] | None = None) -> torch.Tensor:
        """Rows [row0, row1) of every input, cast as the config asks, in the compute dtype, in the
        arena (its next block; the caller gives it back)."""
        dt = compute_dtype(task.compute)
        shape = (len(task.inputs), row1 - row0, task.cols)
        x = self._arena.take(self._x_bytes(task, row1 - row0), dt, shape)
        if task.vocab is not None:
            return self._gather(task, row0, row1, x.zero_())
        for k, inp in enumerate(task.inputs):
            index = self.plan.models[inp.model].index
            hasher = hashers[k] if hashers is not None else None
            if task.load_dtype is None or task.load_dtype == inp.dtype:
                index.read_rows(inp.tensor, row0, row1, out=x[k], hasher=hasher)  # one copy, converting
            else:
                raw = index.read_rows(inp.tensor, row0, row1, hasher=hasher)
                x[k].copy_(raw.to(torch_dtype(task.load_dtype)))
        return x

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
        if task.load_dtype is not None:  # the config's dtype applies to gathered rows too
            x = x.to(torch_dtype(task.load_dtype)).to(x.dtype)
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

    def _merge_chunks(self, task: Task, rows: tuple[int, int],
                      reads: ReadAhead[ReadSpec, torch.Tensor | list[torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Merged rows, in order: blocks of rows[0] rows come from the reader, sub-chunks of rows[1]
        are computed."""
        op = self.plan.method.make(task.ctx)
        block, sub = rows
        blocks = _spans(0, task.rows, block)
        if len(blocks) == 1:
            # The whole tensor fits: read it once; statistics passes leave x untouched, and the
            # op may keep per-element state (DARE masks) for the apply pass, as budgeted.
            op.remember_between_passes()
            spec, x = reads.take()
            assert isinstance(x, torch.Tensor) and (spec.r0, spec.r1) == (0, task.rows)
            for p in range(op.stat_passes):
                for a, b in _spans(0, task.rows, sub):
                    op.observe(p, x[:, a:b], a)
                op.end_pass(p)
            for a, b in _spans(0, task.rows, sub):
                yield op.apply(x[:, a:b], a)
            del x
            self._done(reads, spec)
            return
        for p in range(op.stat_passes):
            for r0, r1 in blocks:
                spec, x = reads.take()
                assert isinstance(x, torch.Tensor) and (spec.r0, spec.r1, spec.hash) == (r0, r1, False)
                for a, b in _spans(0, r1 - r0, sub):
                    op.observe(p, x[:, a:b], r0 + a)
                del x
                self._done(reads, spec)
            op.end_pass(p)
        for r0, r1 in blocks:
            spec, x = reads.take()
            assert isinstance(x, torch.Tensor) and (spec.r0, spec.r1, spec.hash) == (r0, r1, True)
            for a, b in _spans(0, r1 - r0, sub):
                yield op.apply(x[:, a:b], r0 + a)
            del x
            self._done(reads, spec)

    def _done(self, reads: ReadAhead[ReadSpec, torch.Tensor | list[torch.Tensor]], spec: ReadSpec) -> None:
        """The consumer is done with a merge block: its bytes and (on the CPU) its arena room are free."""
        reads.done(spec)
        if self.device.type != "cuda":
            self._arena.give_back()

    def _copy_chunks(self, task: Task,
                     reads: ReadAhead[ReadSpec, torch.Tensor | list[torch.Tensor]]) -> Iterator[torch.Tensor]:
        done = 0
        while done < task.rows:
            spec, parts = reads.take()
            assert isinstance(parts, list) and spec.r0 == done
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise PlanError(f"tensor {task.name!r}: non-floating buffer differs between inputs; such tensors "
                                "cannot be merged, only copied when identical")
            done = spec.r1
            yield parts[0]
            del parts
            reads.done(spec)


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(r, min(stop, r + step)) for r in range(start, stop, step)]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def _start_cuda(device: torch.device) -> None:
    """Create the GPU context and load the kernels a merge uses, so that the host memory they
    take (hundreds of MiB: the context, the CUDA libraries' pages) is measured before the budget
    is divided: on an H200 a 1 GiB run peaked at 1459 MiB RSS when this came later."""
    x = torch.arange(1024, dtype=torch.int64, device=device)
    y = (x * 3 + 1).bitwise_xor(x >> 2).view(torch.int32)[:1024].float().abs()
    torch.bincount((y > 0).int()).cpu()
    (y.sum(dtype=torch.float64) + torch.sign(y).sum()).item()
    torch.cuda.synchronize(device)


def _upload(x: torch.Tensor, stream: torch.cuda.Stream,
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


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    arr = t.contiguous().view(torch.uint8).numpy().reshape(-1)
    return memoryview(arr)  # type: ignore[arg-type]  # ndarray has the buffer protocol; numpy's 3.11 stubs omit it


def _has_size(path: str, size: int) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == size
    except OSError:
        return False


WORK_FILES = (PLAN_FILE, JOURNAL_FILE, FILES_RECORD)
_PARTIAL_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors" + re.escape(PARTIAL))


def _remove_outputs(out: str, ours: set[str]) -> None:
    """Unlink (never truncate) what a previous run provably wrote (`ours`), so mmapped readers keep
    their pages; nothing else in `out` is touched. Keeps the work folder's lock, which the caller holds."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == WORK_DIR:
            for inner in os.listdir(path):  # only the work folder's own files (the lock stays)
                if inner in WORK_FILES or inner.endswith(".tmp"):
                    os.unlink(os.path.join(path, inner))
        elif name in ours or (_PARTIAL_SHARD.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path)):
            os.unlink(path)  # an unfinished run's shards carry streammerge's own names and suffix

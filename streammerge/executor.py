"""Run a Plan: stream each task's row chunks through its method and into the output shards.

Imports plan, budget, methods, index, writer, journal, output, dtypes, errors (and torch,
psutil, xxhash). The only module that does both I/O and compute. Tasks run in output-file
order; each reads its inputs in blocks of rows as large as the budget allows (the whole
tensor when it fits, read once for every pass), runs its statistics passes and then the apply
pass over cache-sized sub-chunks of each block, and casts each result to the output dtype,
handing its bytes to the writer while a streaming xxh3-128 hasher sees them. The pass that
reads every input row once also hashes the input bytes. Journaled tensors are skipped on a
rerun.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import torch
import xxhash

from .budget import chunk_budget, chunk_rows, widest_row
from .dtypes import torch_dtype
from .errors import OutputError, PlanError
from .journal import WORK_DIR, Entry, Journal, RunLock, crash_point
from .output import INPUT_KEY_SEP, MANIFEST, OWNED_FILES, finalize, finished_output, manifest_field
from .planner import Plan, Task
from .writer import PARTIAL, ShardWriter

HASH_READ_BYTES = 64 << 20  # re-hashing journaled tensors on resume reads this much at a time


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
                 replace_changed: bool = False, copy_tokenizer: bool = True, write_card: bool = True) -> None:
        """Args:
            overwrite: replace a finished output, even an identical one.
            restart: discard an unfinished run in OUT instead of resuming it.
            chunk_bytes: the chunk budget itself (tests and benchmarks fix chunking with it).
            replace_changed: replace a finished output made from another plan (a pipeline's own stages).
        """
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
            try:
                kept, written, entries, shard_hashes = self._run_tasks(journal, budget)
            finally:
                journal.close()
                for m in self.plan.models:
                    m.index.close()
            crash_point("tasks-done")
            manifest_hash = finalize(self.plan, self.out_dir, entries, shard_hashes, self.copy_tokenizer,
                                     self.write_card)
            shutil.rmtree(os.path.join(self.out_dir, WORK_DIR))
            crash_point("finished")
        finally:
            lock.release()
        return RunStats(time.monotonic() - start, len(self.plan.tasks), kept, written, peak_rss(), manifest_hash)

    def _run_tasks(self, journal: Journal, budget: int) -> tuple[int, int, dict[str, Entry], dict[str, str]]:
        tasks = self.plan.tasks
        kept = sum(1 for t in tasks if journal.done(t.name, t.fingerprint))
        if journal.resumed:
            changed = sum(1 for t in tasks if t.name in journal.entries and not journal.done(t.name, t.fingerprint))
            self.progress.note(f"resuming an interrupted run: {kept} of {len(tasks)} tensors already done"
                          + (f", {changed} changed since and recomputed" if changed else "")
                          + f", {len(tasks) - kept - changed} still to do")
        entries: dict[str, Entry] = {}
        shard_hashes: dict[str, str] = {}
        written = 0
        kept_bytes = sum(t.nbytes for t in tasks if journal.done(t.name, t.fingerprint))
        self.progress.start(len(tasks), self.plan.total_bytes, kept, kept_bytes)
        for shard in self.plan.shards:
            self._unrename(shard.name)
            with ShardWriter(self.out_dir, shard) as w:
                h = xxhash.xxh3_128(shard.header)
                for ti in shard.tasks:
                    t = tasks[ti]
                    entry = journal.done(t.name, t.fingerprint)
                    if entry is None:
                        entry = self._run_task(t, w, h, budget)
                        journal.append(entry)
                        written += t.nbytes
                        self.progress.advance(t.name, t.nbytes)
                    else:
                        for off in range(0, t.nbytes, HASH_READ_BYTES):
                            h.update(w.read(t.begin + off, min(HASH_READ_BYTES, t.nbytes - off)))
                    entries[t.name] = entry
                w.sync()
                shard_hashes[shard.name] = h.hexdigest()
                crash_point("shard-synced")
        self.progress.close()
        return kept, written, entries, shard_hashes

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
        if os.path.exists(final) and not os.path.exists(partial):
            os.replace(final, partial)

    def _up_to_date(self) -> bool:
        if not finished_output(self.out_dir):
            return False
        if manifest_field(self.out_dir, "plan_fingerprint") == self.plan.fingerprint and not self.overwrite:
            self.progress.note(f"{self.out_dir} already holds this exact merge (plan {self.plan.fingerprint[:12]}); "
                          "nothing to do")
            return True
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
        work = os.path.join(out, WORK_DIR)
        finished = finished_output(out)
        if not finished and not os.path.isdir(work) and any(not n.startswith(".") for n in os.listdir(out)):
            raise OutputError(f"{out} is not empty and holds no streammerge run; choose an empty or new folder "
                              "(nothing there was changed)")
        lock = RunLock(out)
        if finished or self.restart:
            _remove_outputs(out)
        return lock

    def _read(self, task: Task, row0: int, row1: int,
              hashers: list[xxhash.xxh3_128] | None = None) -> torch.Tensor:
        """Rows [row0, row1) of every input, cast as the config asks, in the compute dtype."""
        dt = torch.float64 if task.compute == "F64" else torch.float32
        x = torch.empty((len(task.inputs), row1 - row0, task.cols), dtype=dt)
        if task.vocab is not None:
            return self._gather(task, row0, row1, x)
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

    def _run_task(self, task: Task, w: ShardWriter, shard_hash: xxhash.xxh3_128, budget: int) -> Entry:
        crash_point("task-start")
        rows = chunk_rows(self.plan, task, budget)
        h = xxhash.xxh3_128()
        inputs = [xxhash.xxh3_128() for _ in task.inputs]
        out_dt = torch_dtype(task.out_dtype)
        offset = task.begin
        chunks = self._copy_chunks(task, rows, inputs) if task.copy_exact else self._merge_chunks(task, rows, inputs)
        for y in chunks:
            data = _bytes_of(y.to(out_dt))
            del y  # the next chunk is read while this loop variable would still hold it
            w.write(offset, data)
            h.update(data)
            shard_hash.update(data)
            offset += data.nbytes
            del data
            crash_point("chunk-written")
        if offset != task.begin + task.nbytes:
            raise RuntimeError(f"internal error: {task.name} wrote {offset - task.begin} of {task.nbytes} bytes")
        w.sync()
        crash_point("tensor-synced")
        # rows gathered to a new vocabulary are not the input tensors' bytes in order: no hash for them
        read = {} if task.vocab is not None else {
            f"{self.plan.models[i.model].ref}{INPUT_KEY_SEP}{i.tensor}": hi.hexdigest()
            for i, hi in zip(task.inputs, inputs)}
        return Entry(task.name, task.fingerprint, self.plan.shards[task.shard].name, task.begin, task.nbytes,
                     h.hexdigest(), read)

    def _merge_chunks(self, task: Task, rows: tuple[int, int],
                      hashers: list[xxhash.xxh3_128]) -> Iterator[torch.Tensor]:
        """Merged rows, in order: blocks of rows[0] rows are read, sub-chunks of rows[1] computed."""
        op = self.plan.method.make(task.ctx)
        block, sub = rows
        blocks = _spans(0, task.rows, block)
        if len(blocks) == 1:
            # The whole tensor fits: read it once; statistics passes leave x untouched, and the
            # op may keep per-element state (DARE masks) for the apply pass, as budgeted.
            op.remember_between_passes()
            x = self._read(task, 0, task.rows, hashers)
            for p in range(op.stat_passes):
                for a, b in _spans(0, task.rows, sub):
                    op.observe(p, x[:, a:b], a)
                op.end_pass(p)
            for a, b in _spans(0, task.rows, sub):
                yield op.apply(x[:, a:b], a)
            return
        for p in range(op.stat_passes):
            for r0, r1 in blocks:
                x = self._read(task, r0, r1)
                for a, b in _spans(0, r1 - r0, sub):
                    op.observe(p, x[:, a:b], r0 + a)
                del x
            op.end_pass(p)
        for r0, r1 in blocks:
            x = self._read(task, r0, r1, hashers)
            for a, b in _spans(0, r1 - r0, sub):
                yield op.apply(x[:, a:b], r0 + a)
            del x

    def _copy_chunks(self, task: Task, rows: tuple[int, int],
                     hashers: list[xxhash.xxh3_128]) -> Iterator[torch.Tensor]:
        for r0, r1 in _spans(0, task.rows, rows[0]):
            parts = [self.plan.models[i.model].index.read_rows(i.tensor, r0, r1, hasher=hi)
                     for i, hi in zip(task.inputs, hashers)]
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise PlanError(f"tensor {task.name!r}: non-floating buffer differs between inputs; such tensors "
                                "cannot be merged, only copied when identical")
            yield parts[0]


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(r, min(stop, r + step)) for r in range(start, stop, step)]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    arr = t.contiguous().view(torch.uint8).numpy().reshape(-1)
    return memoryview(arr)  # type: ignore[arg-type]  # ndarray has the buffer protocol; numpy's 3.11 stubs omit it


def _remove_outputs(out: str) -> None:
    """Unlink (never truncate) what a previous run wrote, so mmapped readers keep their pages.

    Keeps the work folder's lock, which the caller holds.
    """
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == WORK_DIR:
            for inner in os.listdir(path):
                if inner != "lock":
                    os.unlink(os.path.join(path, inner))
        elif name in OWNED_FILES or (name.startswith("model") and ".safetensors" in name):
            os.unlink(path)

"""Run a Plan: stream each task's row chunks through its method and into the output shards.

Imports plan, methods, index, writer, journal, output, dtypes, errors (and torch, psutil,
xxhash). The only module that does both I/O and compute. Tasks run in output-file order;
each picks `chunk_rows` from the budget and its per-row cost, runs its statistics passes,
then the apply pass, casting each chunk to the output dtype and handing its bytes to the
writer while a streaming xxh3-128 hasher sees them. Journaled tensors are skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch
import xxhash

from .budget import chunk_budget, chunk_rows, widest_row
from .dtypes import torch_dtype
from .errors import OutputError, PlanError
from .journal import WORK_DIR, Entry, Journal
from .output import MANIFEST, OWNED_FILES, finalize, finished_output
from .plan import Plan, Task
from .writer import ShardWriter


@dataclass(frozen=True)
class RunStats:
    """What a run did, for the summary line."""

    seconds: float
    tensors: int
    resumed: int  # tensors taken from the journal
    bytes_written: int
    peak_rss: int
    manifest_hash: str


Progress = Callable[[str], None]


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
    """Runs one plan into one output folder."""

    def __init__(self, plan: Plan, out_dir: str, max_memory: int, progress: Progress | None = None,
                 overwrite: bool = False, restart: bool = False, chunk_bytes: int | None = None) -> None:
        """`chunk_bytes`, if given, is the chunk budget itself (tests and benchmarks fix chunking with it)."""
        self.plan, self.out_dir = plan, out_dir
        self.max_memory = max_memory
        self.chunk_bytes = chunk_bytes
        self.progress = progress or (lambda _msg: None)
        self.overwrite, self.restart = overwrite, restart

    def run(self) -> RunStats:
        start = time.monotonic()
        if self.chunk_bytes is not None:
            budget = max(self.chunk_bytes, widest_row(self.plan)[0])
        else:
            budget = chunk_budget(self.plan, self.max_memory)  # fails before OUT is touched
        self._prepare_output()
        summary = {"config": self.plan.config.text, "seed": self.plan.seed}
        journal = Journal(self.out_dir, self.plan.fingerprint, summary)
        resumed = sum(1 for t in self.plan.tasks if journal.done(t.name, t.fingerprint))
        if resumed:
            self.progress(f"resuming: {resumed} of {len(self.plan.tasks)} tensors already done")
        hashes: dict[str, str] = {}
        shard_hashes: dict[str, str] = {}
        written = 0
        try:
            for shard in self.plan.shards:
                with ShardWriter(self.out_dir, shard) as w:
                    h = xxhash.xxh3_128(shard.header)
                    for ti in shard.tasks:
                        t = self.plan.tasks[ti]
                        entry = journal.done(t.name, t.fingerprint)
                        if entry is None:
                            entry = self._run_task(t, w, h, budget)
                            journal.append(entry)
                            written += t.nbytes
                            self.progress(f"[{ti + 1}/{len(self.plan.tasks)}] {t.name}")
                        else:
                            for off in range(0, t.nbytes, 64 << 20):
                                h.update(w.read(t.begin + off, min(64 << 20, t.nbytes - off)))
                        hashes[t.name] = entry.xxh3_128
                    w.sync()
                    shard_hashes[shard.name] = h.hexdigest()
        finally:
            journal.close()
            for m in self.plan.models:
                m.index.close()
        manifest_hash = finalize(self.plan, self.out_dir, hashes, shard_hashes)
        shutil.rmtree(os.path.join(self.out_dir, WORK_DIR), ignore_errors=True)
        return RunStats(time.monotonic() - start, len(self.plan.tasks), resumed, written, peak_rss(),
                        manifest_hash)

    def _prepare_output(self) -> None:
        out = self.out_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise OutputError(f"{out} exists and is not a folder; choose another output path")
        os.makedirs(out, exist_ok=True)
        if finished_output(out):
            if not self.overwrite:
                raise OutputError(f"{out} already holds a finished merge ({MANIFEST}); pass --overwrite to "
                                  "replace it, or choose another output folder")
            _remove_outputs(out)
        work = os.path.join(out, WORK_DIR)
        if self.restart and os.path.isdir(work):
            _remove_outputs(out)
        if not os.path.isdir(work) and any(not n.startswith(".") for n in os.listdir(out)):
            raise OutputError(f"{out} is not empty and holds no streammerge run; choose an empty or new folder "
                              "(nothing there was changed)")
        if not os.access(out, os.W_OK):
            raise OutputError(f"{out} is not writable; choose a folder you can write to")

    def _read(self, task: Task, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) of every input, cast as the config asks, in the compute dtype."""
        dt = torch.float64 if task.compute == "F64" else torch.float32
        x = torch.empty((len(task.inputs), row1 - row0, task.cols), dtype=dt)
        for k, inp in enumerate(task.inputs):
            raw = self.plan.models[inp.model].index.read_rows(inp.tensor, row0, row1)
            if task.load_dtype is not None:
                raw = raw.to(torch_dtype(task.load_dtype))
            x[k].copy_(raw)
        return x

    def _run_task(self, task: Task, w: ShardWriter, shard_hash: xxhash.xxh3_128, budget: int) -> Entry:
        rows = chunk_rows(self.plan, task, budget)
        h = xxhash.xxh3_128()
        out_dt = torch_dtype(task.out_dtype)
        offset = task.begin
        if task.copy_exact:
            chunks = self._copy_chunks(task, rows)
        else:
            chunks = self._merge_chunks(task, rows)
        for y in chunks:
            # ndarray has the buffer protocol; numpy's stubs for Python 3.11 do not say so
            data = memoryview(y.to(out_dt).contiguous().view(torch.uint8).numpy().reshape(-1))  # type: ignore[arg-type]
            del y  # the next chunk is read while this loop variable would still hold it
            w.write(offset, data)
            h.update(data)
            shard_hash.update(data)
            offset += data.nbytes
            del data
        if offset != task.begin + task.nbytes:
            raise RuntimeError(f"internal error: {task.name} wrote {offset - task.begin} of {task.nbytes} bytes")
        w.sync()
        return Entry(task.name, task.fingerprint, self.plan.shards[task.shard].name, task.begin, task.nbytes,
                     h.hexdigest())

    def _merge_chunks(self, task: Task, rows: int) -> Iterator[torch.Tensor]:
        op = self.plan.method.make(task.ctx)
        if rows >= task.rows:
            # The whole tensor fits: read it once; statistics passes leave x untouched.
            x = self._read(task, 0, task.rows)
            for p in range(op.stat_passes):
                op.observe(p, x, 0)
                op.end_pass(p)
            yield op.apply(x, 0)
            return
        spans = [(r, min(task.rows, r + rows)) for r in range(0, task.rows, rows)]
        for p in range(op.stat_passes):
            for r0, r1 in spans:
                op.observe(p, self._read(task, r0, r1), r0)
            op.end_pass(p)
        for r0, r1 in spans:
            yield op.apply(self._read(task, r0, r1), r0)

    def _copy_chunks(self, task: Task, rows: int) -> Iterator[torch.Tensor]:
        for r0 in range(0, task.rows, rows):
            r1 = min(task.rows, r0 + rows)
            parts = [self.plan.models[i.model].index.read_rows(i.tensor, r0, r1) for i in task.inputs]
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise PlanError(f"tensor {task.name!r}: non-floating buffer differs between inputs; such tensors "
                                "cannot be merged, only copied when identical")
            yield parts[0]


def _remove_outputs(out: str) -> None:
    """Unlink (never truncate) what a previous run wrote, so mmapped readers keep their pages."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == WORK_DIR:
            shutil.rmtree(path)
        elif name in OWNED_FILES or (name.startswith("model") and ".safetensors" in name):
            os.unlink(path)

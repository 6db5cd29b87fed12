"""The committer: the only writer of output rows. It writes each task's rows at their planned
offsets, hashes them (per tensor and per shard), syncs, and journals finished tensors.

Imports planner, journal, writer, progress, format, config (and torch, numpy, xxhash). Tensors are committed in
groups: once GROUP_COMMIT_BYTES of finished tensors wait (and at each shard's end) the shard is
synced once, then their journal lines are appended, so a tensor's bytes are always on disk
before its line. The sync runs on a thread of its own while the merge goes on; the group's lines
are appended once it returned, when the next group is ready or the shard ends. Shards are
written in order, each tensor's rows in row order: a shard's hash streams over its bytes as they
are written. Runs on the write-behind thread (or inline).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from .config import ConfigWarning
from .dtypes import torch_dtype
from .format import blocks
from .journal import Entry, Journal, crash_point
from .planner import Plan, Task
from .progress import Progress
from .writer import ShardWriter

# Finished tensors are synced and journaled together once this many bytes wait (and at each
# shard's end): an fdatasync per tensor cost 5% of a 3-model TIES here, more on slow disks.
GROUP_COMMIT_BYTES = 64 << 20


class _Behind:
    """A call running on a thread of its own; join() waits for it and raises what it raised."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="streammerge-sync", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the thread that joins
            self._error = e

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait for the call, whatever it does (what it raised is dropped)."""
        self._thread.join()


@dataclass
class _Open:
    """The shard being written."""

    index: int
    writer: ShardWriter
    hasher: xxhash.xxh3_128
    next: int  # the offset the next bytes must have (the shard's hash streams in order)


class Committer:
    """Writes a plan's shards in `out_dir`, journaling each finished tensor.

    Example:
        >>> c = Committer(out_dir, plan, journal, progress)
        >>> c.open_shard(0); c.write(task, 0, rows); c.end_task(task, digests); c.end_shard()
    """

    # Whether a group's sync runs behind the merge (on its own thread) or before anything goes on.
    SYNC_BEHIND = True

    def __init__(self, out_dir: str, plan: Plan, journal: Journal, progress: Progress) -> None:
        self.out_dir, self.plan, self.journal, self.progress = out_dir, plan, journal, progress
        self.entries: dict[str, Entry] = {}  # journaled tensors of this run's shards, by name
        self.shard_hashes: dict[str, str] = {}
        self._shard: _Open | None = None
        self._tensor: dict[str, xxhash.xxh3_128] = {}  # per task being written: its bytes' hash
        self._uncommitted: list[Entry] = []  # written, not yet synced and journaled
        self._uncommitted_bytes = 0
        self._non_finite: set[str] = set()  # tensors already reported holding NaN or Inf
        self._syncing: tuple[_Behind, list[Entry], int] | None = None  # a group whose sync is under way

    def open_shard(self, index: int) -> None:
        shard = self.plan.shards[index]
        self._shard = _Open(index, ShardWriter(self.out_dir, shard), xxhash.xxh3_128(shard.header), len(shard.header))

    def start_task(self, task: Task) -> None:
        crash_point("task-start")
        self._tensor[task.name] = xxhash.xxh3_128()

    def write(self, task: Task, row0: int, y: torch.Tensor) -> None:
        """Rows row0.. of `task` at their place in the shard, in the output dtype (the runner's threads
        cast them; rows given in another dtype are cast here)."""
        s = self._open()
        cast, finite = output_rows(task, y)
        if not finite and task.name not in self._non_finite:
            self._non_finite.add(task.name)  # said once per tensor; NaN or Inf in the output is never wanted
            warn_non_finite(task.name, row0)
        data = bytes_of(cast)
        offset = task.begin + row0 * (task.nbytes // max(1, task.rows))
        if offset != s.next:
            raise RuntimeError(f"internal error: {task.name}: rows from {row0} arrive at byte {offset}, the shard "
                               f"is written up to {s.next}")
        s.writer.write(offset, data)
        self._tensor[task.name].update(data)
        s.hasher.update(data)
        s.next = offset + data.nbytes
        self.progress.written(data.nbytes)
        crash_point("chunk-written")

    def end_task(self, task: Task, inputs: dict[str, str], stats: dict[str, object] | None = None) -> None:
        """`task` is written: its entry (with its inputs' hashes and what the merge did) waits to be
        committed with others."""
        s = self._open()
        if s.next != task.begin + task.nbytes:
            raise RuntimeError(f"internal error: {task.name} wrote {s.next - task.begin} of {task.nbytes} bytes")
        digest = self._tensor.pop(task.name).hexdigest()
        self._uncommitted.append(Entry(task.name, task.fingerprint, self.plan.shards[task.shard].name, task.begin,
                                       task.nbytes, digest, inputs, stats))
        self._uncommitted_bytes += task.nbytes
        if self._uncommitted_bytes >= GROUP_COMMIT_BYTES:
            self.commit()

    def keep(self, task: Task, entry: Entry) -> None:
        """A tensor journaled by an earlier run: its bytes feed the shard's hash again."""
        s = self._open()
        for block in blocks(s.writer.read, task.begin, task.nbytes):
            s.hasher.update(block)
        s.next = task.begin + task.nbytes
        self.entries[task.name] = entry

    def commit(self, behind: bool = True) -> None:
        """Group commit: the waiting tensors' bytes synced, then their journal lines appended. The
        sync runs behind (fdatasync waits on the disk, not on a core: measured on 2 cores, a
        3-model linear merge spent 1.3 of its 5.4 s waiting in it), and the lines are appended
        when the next group is ready or the shard ends. A shard's last group (`behind` False) is
        synced here: nothing is left to go on with. A group still syncing is journaled first."""
        self._settle()
        if not self._uncommitted:
            return
        group, nbytes = self._uncommitted, self._uncommitted_bytes
        self._uncommitted, self._uncommitted_bytes = [], 0
        if not (behind and self.SYNC_BEHIND):
            self._sync()
            self._journal(group, nbytes)
            return
        self._syncing = (_Behind(self._sync), group, nbytes)

    def _settle(self) -> None:
        """The group whose sync is under way: waited for, then journaled."""
        if self._syncing is None:
            return
        behind, group, nbytes = self._syncing
        self._syncing = None
        behind.join()
        self._journal(group, nbytes)

    def _journal(self, group: list[Entry], nbytes: int) -> None:
        """`group`'s bytes are synced: its lines appended."""
        crash_point("tensor-synced")
        self.journal.append(*group)
        for e in group:
            self.entries[e.name] = e
        self.progress.committed(len(group), nbytes)

    def _sync(self) -> None:
        """The waiting tensors' bytes on disk (they are all in the open shard)."""
        self._open().writer.sync()

    def end_shard(self) -> None:
        """Everything of the open shard is written: commit, sync, record its hash, close it."""
        self.commit(behind=False)
        s = self._open()
        s.writer.sync()
        self.shard_hashes[self.plan.shards[s.index].name] = s.hasher.hexdigest()
        crash_point("shard-synced")
        s.writer.close()
        self._shard = None

    def close(self) -> None:
        """Close an open shard (after an error: what is journaled stays, the rest is redone)."""
        if self._syncing is not None:  # its file must stay open until the sync returns
            self._syncing[0].wait()
            self._syncing = None
        if self._shard is not None:
            self._shard.writer.close()
            self._shard = None

    def _open(self) -> _Open:
        if self._shard is None:
            raise RuntimeError("internal error: no shard is open")
        return self._shard


# A 16-bit float's bits with its sign cleared are at least these exactly when it is Inf or NaN
# (every exponent bit set).
_NON_FINITE_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def output_rows(task: Task, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Rows as they are written: in the output dtype (merged rows come cast by the runner's threads,
    a copied tensor's in its own dtype), on the CPU; and whether they are all finite.

    A merged NaN is written as the dtype's quiet NaN with the sign clear and no payload: which NaN
    an operation gives depends on the instruction and the order of its operands (x86's default NaN
    is negative, a GPU's positive, a compiled loop may add in the other order), and the output
    bytes must not. A copied tensor's bytes are the input's, whatever they hold."""
    cast = y.to(torch_dtype(task.out_dtype)).cpu()
    if all_finite(cast):
        return cast, True
    if not task.copy_exact:
        cast = cast.masked_fill(cast.isnan(), float("nan"))
    return cast, False


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. An integer or bool tensor holds none. A 16-bit float tensor on the CPU:
    no bit pattern's magnitude reaches the all-ones exponent (0.15 ns per element; its float32
    sum took 0.44). Else its sum is finite (one reduction, no boolean tensor:
    isfinite().all() cost a fifth of a linear merge), or the elements are looked at (a finite sum
    may overflow)."""
    if not t.is_floating_point():
        return True
    top = _NON_FINITE_BITS.get(t.dtype)
    if top is not None and t.device.type == "cpu":
        if t.numel() == 0:
            return True
        # NaN and ±Inf: the patterns whose magnitude is at least `top`, as int16 the positive ones at
        # least top, as uint16 the negative ones at least 0x8000 | top. Two reductions and no
        # temporary: bitwise_and's (written, then read) made it 1.3 ns per element in a merge
        bits = t.contiguous().view(torch.int16).numpy()
        return int(bits.max()) < top and int(bits.view(np.uint16).max()) < (0x8000 | top)
    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def warn_non_finite(tensor: str, row0: int) -> None:
    """Say that tensor `tensor`'s merged values hold NaN or Inf, from row `row0` on."""
    warnings.warn(f"tensor {tensor!r}: the merged values hold NaN or Inf (from row {row0} on); an input holds "
                  f"them, or the method divided by zero (`streammerge plan --explain {tensor}` lists the inputs)",
                  ConfigWarning, stacklevel=3)


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    arr = t.contiguous().view(torch.uint8).numpy().reshape(-1)
    return memoryview(arr)  # type: ignore[arg-type]  # ndarray has the buffer protocol; numpy's 3.11 stubs omit it

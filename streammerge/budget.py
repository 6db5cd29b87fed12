"""The memory budget: what one row of a task costs, how many rows fit, what a plan needs.

Imports plan, dtypes, errors (and psutil). The budget (`--max-memory`) covers the whole
process: its baseline (interpreter, torch) measured at start, a reserve, and the chunk
buffers. A chunk of r rows of a task holds r·row_cost(task) bytes at its peak: every input
row in the compute dtype, one raw input row being read and cast, the kernel's temporaries
(calibrated per method), and the output row cast for writing.
"""

from __future__ import annotations

import psutil

from .dtypes import itemsize
from .errors import PlanError
from .planner import Plan, Task

RESERVE_BYTES = 64 << 20  # hashing, journal, small tensors, torch's per-thread buffers, allocator slack
# Chunk buffers get this share of what the budget leaves: the heap's peak exceeds live
# memory by fragmentation (glibc keeps freed chunk-sized blocks). Measured on the 15-model
# DARE-TIES: without it, a 512 MiB budget peaked at 545 MiB RSS. Forcing every buffer
# through mmap (mallopt M_MMAP_THRESHOLD) removed the overshoot but tripled the run time.
CHUNK_SHARE = 0.8


def row_cost(plan: Plan, task: Task) -> int:
    """Bytes held per row of a chunk of `task` at its peak."""
    csize = 8 if task.compute == "F64" else 4
    raw = max(itemsize(i.dtype) for i in task.inputs)
    cast = itemsize(task.load_dtype) if task.load_dtype else 0
    temp = 1.0 if task.copy_exact else plan.method.make(task.ctx).temp_fixed
    # a raw row is both mapped (until dropped) and copied out while it is read
    per_row = len(task.inputs) * csize + temp * csize + 2 * raw + cast + itemsize(task.out_dtype)
    return int(task.cols * per_row) + 64


def widest_row(plan: Plan) -> tuple[int, Task | None]:
    """The largest one-row cost of any task, and that task."""
    costs = [(row_cost(plan, t), i) for i, t in enumerate(plan.tasks)]
    if not costs:
        return 0, None
    cost, i = max(costs)
    return cost, plan.tasks[i]


def baseline_bytes() -> int:
    """What the process holds before merging (interpreter, libraries)."""
    return int(psutil.Process().memory_info().rss)


def default_max_memory() -> int:
    """Half of the memory available now: room for the page cache and other programs."""
    return int(psutil.virtual_memory().available // 2)


def smallest_budget(plan: Plan, baseline: int | None = None) -> int:
    """The smallest --max-memory that fits one row of every task."""
    base = baseline_bytes() if baseline is None else baseline
    return base + RESERVE_BYTES + int(widest_row(plan)[0] / CHUNK_SHARE) + 1


def chunk_budget(plan: Plan, max_memory: int, baseline: int | None = None) -> int:
    """Bytes chunk buffers may use under `max_memory`.

    Raises:
        PlanError: not even one row of the widest task fits; names it and the smallest budget.
    """
    base = baseline_bytes() if baseline is None else baseline
    budget = int((max_memory - base - RESERVE_BYTES) * CHUNK_SHARE)
    need, task = widest_row(plan)
    if budget < need and task is not None:
        raise PlanError(f"--max-memory {_mib(max_memory)} is too small: tensor {task.name!r} needs {_mib(need)} "
                        f"for one row on top of {_mib(base + RESERVE_BYTES)} the process holds; use at least "
                        f"--max-memory {_mib(smallest_budget(plan, base), up=True)}")
    return budget


def chunk_rows(plan: Plan, task: Task, budget_bytes: int) -> int:
    """Rows per chunk of `task` within `budget_bytes` of chunk buffers (at least one)."""
    return max(1, min(task.rows, budget_bytes // row_cost(plan, task)))


def expected_peak(plan: Plan, budget_bytes: int, baseline: int | None = None) -> int:
    """The process's expected peak memory when chunks get `budget_bytes`."""
    base = baseline_bytes() if baseline is None else baseline
    chunks = max((chunk_rows(plan, t, budget_bytes) * row_cost(plan, t) for t in plan.tasks), default=0)
    return base + RESERVE_BYTES + int(chunks / CHUNK_SHARE)


def _mib(n: int, up: bool = False) -> str:
    mib = -(-n // (1 << 20)) if up else n // (1 << 20)
    return f"{mib}MiB"

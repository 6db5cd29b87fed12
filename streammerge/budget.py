"""The memory budget: what one row of a task costs, how many rows fit, what a plan needs.

Imports planner, index, units, dtypes, errors (and psutil). The
budget (`--max-memory`) covers the whole process: its baseline (interpreter, torch) measured at
start, a reserve, and the chunk buffers. Per-row costs come from each task's `cost`, which its
method declared at plan time. A task is read in blocks of rows (every input in the compute dtype, one raw input
row being read and cast) and computed in cache-sized sub-chunks of a block (the kernel's
temporaries, calibrated per method, and the output cast for writing).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import psutil

from .dtypes import is_float, itemsize
from .errors import PlanError
from .index import STAGE_BYTES
from .methods import fused
from .planner import Plan, Task
from .units import mib_str, size_str

RESERVE_BYTES = 64 << 20  # hashing, journal, small tensors, torch's per-thread buffers, allocator slack
WRITE_BEHIND_BYTES = 8 << 20  # finished rows waiting for the writer thread (overlap.WriteBehind)
# index.read_rows' staging buffers: the reader thread's and the main one's, or the two the compute
# threads read a block through (reader.InputReader's `each`)
READ_STAGING_BYTES = 2 * STAGE_BYTES
HELD_BYTES = RESERVE_BYTES + WRITE_BEHIND_BYTES + READ_STAGING_BYTES  # outside the chunk buffers
# Chunk buffers get this share of what the budget leaves: the heap's peak exceeds live
# memory by fragmentation (glibc keeps freed chunk-sized blocks). Measured on the 15-model
# DARE-TIES: without it, a 512 MiB budget peaked at 545 MiB RSS. Forcing every buffer
# through mmap (mallopt M_MMAP_THRESHOLD) removed the overshoot but tripled the run time.
CHUNK_SHARE = 0.8
# Elements per input in one compute sub-chunk, at least. Measured on the 14-model DARE-TIES: 128
# rows of 1024 (0.5 MiB per input in float32) ran 2-3x faster per element than whole-tensor
# chunks, and 64 rows 1.4x slower (49 s against 70 s at a 512 MiB cap; 256 rows: 49.7 s).
COMPUTE_ELEMENTS = 128 * 1024
# Inputs' bytes in one compute sub-chunk: merges of few inputs get more elements per input, so a
# sub-chunk's work outweighs its handling (Python, a thread's turn, a write). Measured at a 512 MiB
# cap on 2 cores: the 3-model linear merge 4.1-5.0 s at 128K elements per input, 3.1-3.2 s at 512K;
# the 2-model SLERP 4.5-5.1 s, 3.5-3.8 s at 512K and 4.2-4.8 s at 2M; the 3-model TIES 14.3-16.3 s,
# 12.3-15.7 s at 256K-1M. At most COMPUTE_ELEMENTS_MAX per input (2M was slower for SLERP).
COMPUTE_BYTES = 6 << 20
COMPUTE_ELEMENTS_MAX = 512 * 1024
# A tensor read whole may be computed in sub-chunks down to this many elements per input rather than read
# again for each pass in blocks: at a 512 MiB cap a 3-model TIES's MLP tensors had no room for four
# 512-row sub-chunks beside the tensor and were read three times, now once (the merge's reads 4.29 GiB
# -> 2.32 GiB); a 15-model DARE-TIES's attention tensors are read once rather than twice.
WHOLE_SUB_ELEMENTS = 32 * 1024
# Sub-chunks each compute thread may have begun or finished ahead of the one the runner yields
# next (runner.Workers): room to go on while one thread is held up.
PIECES_AHEAD = 2
# Blocks the read-ahead holds at most, the one computing included, in bytes of the run's largest
# block (Schedule.capacity; expected_peak counts the same): the next block read while one computes
# is all the overlap there is, and a read-ahead allowed the whole budget ran through fresh memory.
# Measured on the 7B-shaped set (2 cores, warm page cache), the 3-model linear merge at the default
# budget (half the available memory, 11 GiB here): 11.3-12.7 s of merge at 4.3 GiB peak RSS, with
# 12 s of system time touching new pages, against 3.4-4.2 s at 1.7 GiB with two blocks (and
# 3.1-4.3 s inside --max-memory 512MiB): a larger budget had made the merge three times slower.
AHEAD_BLOCKS = 2
# Block inputs' bytes at most for a task without statistics passes (linear, task arithmetic,
# passthrough, ...): it reads each input row once whatever its blocks' size, so a whole tensor in
# one block only holds more memory and starts its kernels later. Measured with two blocks ahead
# (above), the same 7B-shaped linear merge at the default budget: blocks of about 8 MiB 5.4-6.8 s
# (each block's handling), 32 MiB 3.4-3.6 s at 330 MiB peak RSS, 64 MiB 3.3-3.5 s at 475 MiB,
# whole tensors (786 MiB embeddings) 3.4-4.2 s at 1.7 GiB.
STREAM_BLOCK_BYTES = 32 << 20
# Per-element state a method keeps between passes (DARE's packed keep-masks) may take up to this
# share of the chunk budget for a tensor that does not fit whole: the apply pass then need not
# draw every mask again (1.7 of the 10 ns per element a 14-model DARE-TIES spent in its kernels).
HOLD_SHARE = 0.5


# The report (stats.py) takes every figure over every stride-th row of a tensor (rows 0, s, 2s,
# ...): a fixed sample, the same whatever the chunking, of at least MIN_SAMPLED rows where the
# tensor has them, one row in at most MAX_STRIDE. Measured: every element cost ~20% of the seed's
# stage-1 time (small set); one row in 8 cost 8-20% of a 3-model TIES once its kernels were compiled
# (medium set, 18.2-20.5 s against 16.6-16.8 s with row 0 alone); one in 32 keeps 32-1000 rows of
# Mistral-7B's tensors. (At least 64 rows, every row of the seed's tiny stage 1 with its 16-96-row
# tensors, took it 3.1-3.5 s against 2.4-2.9 s at one in 8; at least 8 rows, 2.8-3.3 s against
# 2.8-3.4 s.)
MAX_STRIDE = 32
MIN_SAMPLED = 8


def stride_for(rows: int) -> int:
    """The stride of the report's sample (stats.py) for a tensor of `rows` rows: rows // MIN_SAMPLED,
    between 1 and MAX_STRIDE (budget.py counts the sampled rows' copies)."""
    return min(MAX_STRIDE, max(1, rows // MIN_SAMPLED))


def live_pieces(threads: int) -> int:
    """Sub-chunks alive at once (computing, or finished and waiting) with `threads` compute threads."""
    return 1 if threads <= 1 else PIECES_AHEAD * threads


def block_dtype(task: Task) -> str:
    """The dtype a CPU block holds its inputs in (reader.InputReader). Where at most one pass widens
    the block (widening_passes: a method without statistics passes, or one whose other passes take
    bfloat16 as read), the one dtype the inputs are loaded in (the config's `dtype`, else every
    input's own) when narrower than the compute dtype: bfloat16 and float16 blocks take half the
    memory and memory traffic of float32 ones, and each sub-chunk is converted as it is computed
    (runner), or loaded as it is. Otherwise the compute dtype. (A GPU's blocks are staged raw and
    converted there: it counts them with narrow=False.)

    Measured at a 512 MiB cap, medium set, interleaved runs against float32 blocks: linear 4.0 s
    against 4.5 s; but a block that every pass converts again cost more than it saved, the 15-model
    DARE-TIES 66.3 s against 62.2 s and the gradient SLERP 5.7 s against 5.3 s (TIES the same):
    a sub-chunk of many inputs converted to float32 does not stay in cache, so each pass read
    2 bytes, wrote 4 and read 4 again where it had read 4."""
    loads = _loads(task)
    if task.copy_exact or task.vocab is not None or len(loads) != 1 or widening_passes(task) > 1:
        return task.compute
    (load,) = loads
    return load if is_float(load) and itemsize(load) < itemsize(task.compute) else task.compute


def _loads(task: Task) -> set[str]:
    return {task.load_dtype} if task.load_dtype else {i.dtype for i in task.inputs}


def _loops(task: Task) -> bool:
    """This process computes `task` with the compiled loops: they are loaded (fused.loaded: the plan's
    choice, loops_for) and take its float32 compute (fused.usable)."""
    return task.compute == "F32" and fused.loaded() is not None


def widening_passes(task: Task) -> int:
    """Passes (statistics and apply) that would widen each sub-chunk of a narrow block to the compute
    dtype: all of them, less those whose op takes a bfloat16 block as read (Cost.raw_passes) where
    this process merges with the compiled loops. A method whose every pass takes it so widens
    nothing (DARE-TIES: its draws, sums and apply load bfloat16 themselves), one whose apply pass
    alone widens (SLERP, TIES) widens once, as a float32 block's read does."""
    passes = task.cost.stat_passes + 1
    if task.cost.raw_passes and _loads(task) == {"BF16"} and _loops(task):
        return passes - task.cost.raw_passes
    return passes


def input_row_bytes(task: Task, narrow: bool = True) -> int:
    """Bytes one row of a block holds: every input in the block's dtype (`narrow`: block_dtype's,
    else the compute dtype), and what the op keeps between passes (DARE's packed masks). Rows are
    read with pread straight into the block, or through the staging buffers READ_STAGING_BYTES
    counts, a slice at a time however the config's dtype rounds them (index.read_rows); only a
    vocabulary block is rounded to the config's dtype after it is gathered, an input's rows at once."""
    csize = itemsize(block_dtype(task) if narrow else task.compute)
    cast = itemsize(task.load_dtype) if task.load_dtype and task.vocab is not None else 0
    kept = 0.0 if task.copy_exact else task.cost.held_per_element
    # the report's per-row statistics (stats.py): three float64 sums per input and row, one for the output
    stats = 0 if task.copy_exact else 8 * (3 * len(task.inputs) + 1)
    return int(task.cols * (len(task.inputs) * csize + cast + kept)) + 64 + stats


def compute_row_bytes(task: Task, narrow: bool = True) -> int:
    """Bytes one row of a compute sub-chunk adds: the kernel's temporaries and the cast output, the
    report's statistics' share (piece_bytes), and (`narrow`, a block narrower than the compute
    dtype) the inputs' rows converted."""
    csize = itemsize(task.compute)
    temp = 1.0 if task.copy_exact else _temp_rows(task) + _stats_rows(task) / stride_for(task.rows)
    if narrow and block_dtype(task) != task.compute and widening_passes(task):
        temp += len(task.inputs)
    return int(task.cols * (temp * csize + itemsize(task.out_dtype))) + 64


def _temp_rows(task: Task) -> float:
    """The kernel's temporaries in compute-dtype rows per sub-chunk row (Cost.temp_rows): the
    compiled loops' own (Cost.loop_temp_rows) where this process merges a float32 task with them.
    (DARE's loops hold 2 where torch's forms hold 7: at 512 MiB on Mistral-7B's shapes, counted as
    torch's, its sub-chunks took 38 of the 63 MiB for blocks and sub-chunks, in 48-row pieces.)"""
    loop = task.cost.loop_temp_rows
    if loop is not None and _loops(task):
        return loop
    return task.cost.temp_rows


def piece_bytes(task: Task) -> int:
    """Bytes a compute sub-chunk holds whatever its rows: the report's statistics copy the rows of
    its sample (every stride_for(rows)-th row) as the sub-chunk is computed, and a sub-chunk of s
    rows holds at most s / stride + 1 of them: compute_row_bytes counts the s / stride, this the one
    more. (Counting a copy of every row, as before, left a 15-model merge at 512 MiB 110-row
    sub-chunks where a tenth of that was in use.)"""
    return 0 if task.copy_exact else int(_stats_rows(task) * task.cols * itemsize(task.compute))


def _stats_rows(task: Task) -> float:
    """Compute-dtype rows per sampled row the statistics hold (stats.TensorStats): the inputs' copy
    and the output's, and one more. Where torch's form sums the products (no compiled loops, or a
    float64 merge: fused.product_sums declines) also the products (3 per input, one more) and
    row_sums' float64 copy of them padded to a power of two columns (base.tree_row_sums), which at
    14,336 columns is 2.3 rows per product row; the compiled loop sums the products as it makes
    them. Measured (peak RSS over a sub-chunk's statistics, float32 rows per sampled row), 15
    bfloat16 inputs of 14,336 columns: loops 10.5 (counted 17), torch's form 145.7 (counted 167);
    3 inputs of 4,096: 4.0 (5), 31.6 (34). (The loops were counted as torch's products, 62 rows for
    15 inputs: a sub-chunk's one sampled row took 3.5 MB of a 512 MiB budget on Mistral-7B's MLPs.)"""
    n = len(task.inputs)
    if _loops(task):
        return n + 2.0
    width = 1 << max(0, task.cols - 1).bit_length()
    return 4.0 * n + 2 + (3 * n + 1) * 8 * width / (itemsize(task.compute) * max(1, task.cols))


def sub_elements(task: Task) -> int:
    """Elements per input of a compute sub-chunk: COMPUTE_BYTES of inputs in the compute dtype,
    between COMPUTE_ELEMENTS (many inputs: a 15-model DARE-TIES) and COMPUTE_ELEMENTS_MAX (one or
    two inputs); COMPUTE_ELEMENTS_MAX where the compiled loops take the task's blocks as read
    (Cost.raw_passes), which stream each input through once and repay cache-sized pieces less than
    they pay for the Python around each (the 15-model DARE-TIES, 1 GiB: 9.5-11.0 s of merge at 512K
    elements per input against 11.3-14.2 s at 128K, interleaved)."""
    if task.cost.raw_passes and fused.loaded() is not None:
        return COMPUTE_ELEMENTS_MAX
    share = COMPUTE_BYTES // max(1, len(task.inputs) * itemsize(task.compute))
    return max(COMPUTE_ELEMENTS, min(COMPUTE_ELEMENTS_MAX, share))


def sub_rows(task: Task, threads: int = 1) -> int:
    """Rows of a compute sub-chunk: about sub_elements(task) per input, so a kernel runs in cache and
    a sub-chunk's work outweighs handing it to a thread; and at most a `threads`-th of the tensor's
    rows, so that each thread has a piece of a tensor read whole."""
    return max(1, min(task.rows // max(1, threads), sub_elements(task) // max(1, task.cols)))


def row_cost(task: Task, narrow: bool = True) -> int:
    """Bytes the smallest workable chunk needs: one row read, one row computed."""
    return input_row_bytes(task, narrow) + compute_row_bytes(task, narrow) + piece_bytes(task)


def widest_row(plan: Plan) -> tuple[int, Task | None]:
    """The largest one-row cost of any task, and that task (the plan's kernel forms decided first:
    a block's dtype depends on them, block_dtype)."""
    loops_for(plan)
    return _widest(plan)


def _widest(plan: Plan) -> tuple[int, Task | None]:
    """widest_row in the kernel forms this process is set to (fused.use_for, loops_off)."""
    costs = [(row_cost(t), i) for i, t in enumerate(plan.tasks)]
    if not costs:
        return 0, None
    cost, i = max(costs)
    return cost, plan.tasks[i]


_jit_file_bytes: dict[str, int] = {}  # file pages fused.warm mapped in, by the group of kernels it loaded


def baseline_bytes(plan: Plan | None = None) -> int:
    """What the process holds before merging (interpreter, libraries); with a plan whose method runs
    compiled kernels on a CPU, after loading them (fused.warm of its group: numba, 78-87 MiB of its
    own memory; a later merge in this process of another method loads its group then).

    The ~70 MiB of LLVM's code that loading them maps from llvmlite's library are not counted:
    clean file pages, used to link the kernels and never touched again, which the kernel drops
    under a cap (tests/test_memory.py runs DARE-TIES so under a cgroup)."""
    if plan is not None and loops_for(plan) and plan.method.jit_loops not in _jit_file_bytes:
        before = _file_pages()
        fused.warm(plan.method.jit_loops)
        _jit_file_bytes[plan.method.jit_loops] = max(0, _file_pages() - before)
    return int(psutil.Process().memory_info().rss) - sum(_jit_file_bytes.values())


# What loading a group of compiled loops adds to the memory a run starts from (baseline_bytes, file
# pages not counted), measured in fresh processes (numba 0.6x, llvmlite's LLVM): SLERP's 77.8 MiB,
# the DARE/TIES family's 86.8 MiB; rounded up. Linear's as SLERP's (loading each group alone in a
# fresh process, numba 0.68: 38.2 and 37.3 MiB of anonymous memory). choose_loops leaves them out of
# a budget they do not fit in beside the merge's smallest.
LOOPS_BYTES = {"slerp": 80 << 20, "linear": 80 << 20, "family": 88 << 20, "sums": 80 << 20}


def choose_loops(plan: Plan, max_memory: int) -> Plan:
    """`plan` as a run of it under `max_memory` merges it: with the compiled loops where its size
    wants them (fused.use_for's rule) and they fit, loading them (LOOPS_BYTES) beside the smallest
    budget torch's forms merge in; else marked to merge with torch's forms (Plan.loops_declined),
    the same bytes, slower. A 400 MiB budget was refused for the medium set's 3-model TIES ("use at
    least 432MiB": 87 MiB of it numba's), which torch's forms merge in 344 MiB. Decided before
    numba is imported (importing it is what takes the memory); where this process loaded a group
    already (numba's own share held either way), or STREAMMERGE_JIT=1 asks for the loops, they stay."""
    return choose_loops_from(plan, max_memory, forms_budgets(plan))


def choose_loops_from(plan: Plan, max_memory: int, both: tuple[int, int] | None) -> Plan:
    """choose_loops with forms_budgets(plan) already measured (`both`; `streammerge plan` prints it too)."""
    if both is None or max_memory >= both[1]:
        return plan
    why = (f"torch's forms: the compiled loops (numba, about {mib_str(both[1] - both[0])} more) do not fit in "
           f"--max-memory {mib_str(max_memory)}; from --max-memory {mib_str(suggested_budget(both[1]))} they "
           "run (the same bytes, faster)")
    return dataclasses.replace(plan, loops_declined=why)


def forms_budgets(plan: Plan) -> tuple[int, int] | None:
    """(the smallest budget torch's forms merge `plan` in, the same with the compiled loops loaded
    beside it: LOOPS_BYTES more), measured now, where the budget decides which a run takes
    (choose_loops); None where it does not (no loops for this plan, or they are loaded already)."""
    if os.environ.get("STREAMMERGE_JIT", "") == "1" or _jit_file_bytes or not _wants_loops(plan):
        return None
    with fused.loops_off():  # the rows' costs as torch's forms take them, without importing numba
        torch_forms = _smallest(baseline_bytes(), _widest(plan)[0])
    return torch_forms, torch_forms + loops_bytes(plan)


def loops_bytes(plan: Plan) -> int:
    """What loading `plan`'s compiled loops will add to this process, known without importing numba:
    its group's LOOPS_BYTES where a run of it takes them (fused.use_for's rule, not declined) and no
    group is loaded here yet; else 0."""
    if _jit_file_bytes or not _wants_loops(plan):
        return 0
    return LOOPS_BYTES.get(plan.method.jit_loops, max(LOOPS_BYTES.values()))


def _wants_loops(plan: Plan) -> bool:
    """Whether a run of `plan` takes the compiled loops (loops_for's and fused.use_for's rule), known
    without importing numba: on a CPU, a method with loops, not declined by the budget, numba
    installed, and STREAMMERGE_JIT=1 or (unset) at least the method's jit_min_work."""
    return (plan.device == "cpu" and plan.method.jit and not plan.loops_declined
            and fused.wanted(jit_work(plan), plan.method.jit_min_work) and fused.importable()
            and not plan.method.jit_mismatch())


def loops_for(plan: Plan) -> bool:
    """Decide whether this process merges `plan` with the compiled loops (fused.use_for); every
    schedule is made after this is asked, so no merge follows the choice made for another (nor
    sizes a block by it: block_dtype). A merge on a GPU uses none, nor one of a method without loops
    (which kept the choice of the merge before it: a linear merge after a DARE-TIES in one process
    sized its 262,144-column rows at 14 MiB as if it had loops, 54 MiB in a fresh process)."""
    if plan.device != "cpu" or not plan.method.jit or plan.loops_declined or plan.method.jit_mismatch():
        fused.use_none()
        return False
    return fused.use_for(jit_work(plan), plan.method.jit_min_work)


def kernel_forms(plan: Plan) -> tuple[bool, str]:
    """Whether a run of `plan` in this process takes the compiled loops, and why, in words (for
    `streammerge plan`): the bytes are the same either way, only the speed tells them apart."""
    if plan.device != "cpu":
        return False, f"torch's kernels on {plan.device}"
    if plan.loops_declined:
        return False, plan.loops_declined
    if not plan.method.jit:
        return False, f"torch's kernels ({plan.method.name} has no compiled loops)"
    mismatch = plan.method.jit_mismatch()
    if mismatch:
        return False, f"torch's forms: {mismatch}"
    mode = os.environ.get("STREAMMERGE_JIT", "")
    work = jit_work(plan)
    size, least = f"{work / 1e6:,.0f}M element-inputs", f"{plan.method.jit_min_work / 1e6:,.0f}M"
    if loops_for(plan):
        return True, "compiled loops (numba): " + (
            "STREAMMERGE_JIT=1" if mode == "1" else f"{size}, at least the {least} that repay loading numba")
    if mode == "0":
        return False, "torch's forms: STREAMMERGE_JIT=0"
    if mode != "1" and work < plan.method.jit_min_work:
        return False, (f"torch's forms: {size}, under the {least} that repay loading numba "
                       "(STREAMMERGE_JIT=1 loads it anyway)")
    return False, "torch's forms: numba cannot be imported here (pip install numba for the compiled loops)"


def jit_work(plan: Plan) -> int:
    """Elements times inputs over the tensors the plan's method computes (fused.use_for's measure)."""
    return sum(t.rows * t.cols * len(t.inputs) for t in plan.tasks if not t.copy_exact)


def _file_pages() -> int:
    """Resident pages mapped from files (Linux: RssFile + RssShmem; elsewhere 0)."""
    return int(getattr(psutil.Process().memory_info(), "shared", 0))


def default_max_memory() -> int:
    """Half of the memory available now: room for the page cache and other programs."""
    return int(psutil.virtual_memory().available // 2)


def smallest_budget(plan: Plan, baseline: int | None = None) -> int:
    """The smallest --max-memory that fits one row of every task."""
    base = baseline_bytes(plan) if baseline is None else baseline
    return _smallest(base, widest_row(plan)[0])


def _smallest(base: int, row: int) -> int:
    """The smallest --max-memory for a process holding `base` whose widest row costs `row`."""
    return base + HELD_BYTES + int(row / CHUNK_SHARE) + 1


# What a run's process may hold beyond the baseline a refusal measured, which the figure it asks for
# ("use at least") adds, in whole 8 MiB: the smallest budget alone, followed, was refused again by
# the next run. Measured on the seed pipeline's tiny stand-ins, refused at 100MiB with "use at least
# 322MiB": at 322MiB three runs were refused again, asking for 325 and 324 MiB (a fresh process
# holds a few MiB more by its stage's check) and 336 MiB (its stage 2, once stage 1 had touched
# the library code it runs: 13 MiB more); a test worker's history moved the figure by up to 20 MiB.
# A pipeline's later stages are checked before the first runs with this much room (pipeline.
# check_budgets): a budget less than that above a later stage's smallest passed that check, and
# the stage refused it once the stages before it had run.
GROWTH_BYTES = 24 << 20
SUGGEST_STEP = 8 << 20


def suggested_budget(smallest: int) -> int:
    """The --max-memory to ask for where a budget is too small: `smallest` (smallest_budget's figure)
    with GROWTH_BYTES of room beside it, rounded up to SUGGEST_STEP."""
    return -(-(smallest + GROWTH_BYTES) // SUGGEST_STEP) * SUGGEST_STEP


def chunk_budget(plan: Plan, max_memory: int, baseline: int | None = None, room: int = 0) -> int:
    """Bytes chunk buffers may use under `max_memory`; with `room` bytes more held than `baseline`
    (a pipeline's later stage checked before the stages before it run: GROWTH_BYTES).

    Raises:
        PlanError: not even one row of the widest task fits; names it and the budget to use.
    """
    base = baseline_bytes(plan) if baseline is None else baseline
    budget = int((max_memory - base - room - HELD_BYTES) * CHUNK_SHARE)
    need, task = widest_row(plan)
    if budget < need and task is not None:
        held = base + HELD_BYTES
        later = (f", and room for the {size_str(room)} more a stage's process may hold once the stages "
                 "before it ran" if room else "")
        raise PlanError(f"--max-memory {mib_str(max_memory)} is too small: tensor {task.name!r} needs "
                        f"{size_str(need)} for one row on top of {size_str(held)} the process holds{later}; use at "
                        f"least --max-memory {mib_str(suggested_budget(smallest_budget(plan, base)))}"
                        f"{cuda_build_hint(plan)}")
    return budget


def cuda_build_hint(plan: Plan) -> str:
    """Where a merge on the CPU was refused a budget and this process's torch is a CUDA build, what
    that build costs and what to install instead: importing torch 2.11's CUDA 13 build held 499 MiB
    of RSS on the lent GPU machine, the CPU wheel 223 MiB on this project's (README, torch)."""
    import torch

    if plan.device != "cpu" or not getattr(torch.version, "cuda", None):
        return ""
    return (f" (torch {torch.__version__} is a CUDA build: its libraries hold about 275 MiB more than the CPU-only "
            "build's, which merges on the CPU at smaller budgets: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)")


def chunk_rows(task: Task, budget_bytes: int, overlap: bool = False,
               whole_blocks: bool = False, threads: int = 1, narrow: bool = True) -> tuple[int, int, int]:
    """(block rows read at once, sub-chunk rows computed at once, compute threads) for `task`
    within `budget_bytes`.

    Blocks are as large as the budget allows, so each input row is read once per pass (once
    in all when the whole tensor fits); kernels run over cache-sized sub-chunks of a block,
    live_pieces(threads) of them at once; when the tensor does not fit whole, they take at most
    half the budget (fewer threads when a row for each would take more) and are never larger
    than a block. With `overlap`, a tensor that does not fit whole is read in blocks of
    half the budget, so the next block can be read while one computes. A task without statistics
    passes reads each row once whatever its blocks, so its blocks hold STREAM_BLOCK_BYTES of inputs
    at most. `whole_blocks` computes a block at once (a GPU's kernels want large tensors, not
    cache-sized ones).
    """
    compute = compute_row_bytes(task, narrow)
    per_row = input_row_bytes(task, narrow)
    piece = piece_bytes(task)
    if whole_blocks:
        block = (budget_bytes - piece) // (per_row + compute)
        if overlap and block < task.rows:
            block = (budget_bytes // 2 - piece) // (per_row + compute)
        block = max(1, min(task.rows, block))
        return block, block, 1
    if task.cost.stat_passes == 0:  # one pass: blocks of STREAM_BLOCK_BYTES at most, whatever the budget
        block, sub, threads = _chunk_rows(task, budget_bytes, overlap, threads, compute, per_row, piece)
        block = max(1, min(block, STREAM_BLOCK_BYTES // max(1, per_row)))
        return block, min(sub, block), threads
    return _chunk_rows(task, budget_bytes, overlap, threads, compute, per_row, piece)


def _chunk_rows(task: Task, budget_bytes: int, overlap: bool, threads: int, compute: int, per_row: int,
                piece: int) -> tuple[int, int, int]:
    """chunk_rows of CPU blocks, whatever the task's passes."""
    sub = sub_rows(task, threads)
    whole_sub = (budget_bytes - task.rows * per_row - live_pieces(threads) * piece) // (live_pieces(threads) * compute)
    if whole_sub >= min(sub, max(1, WHOLE_SUB_ELEMENTS // max(1, task.cols))):
        return task.rows, max(1, min(sub, whole_sub)), threads  # whole, in smaller sub-chunks if need be
    # Not whole: sub-chunks get at most half of the room, blocks the rest (sub-chunks that took
    # it all left a 12-model DARE 4-row blocks, 35 times slower than one thread's 2,136), and
    # fewer threads compute when even one-row sub-chunks for each would take more.
    room = budget_bytes // 2 if overlap and budget_bytes // 2 >= compute + piece + per_row else budget_bytes
    while threads > 1 and live_pieces(threads) * (compute + piece) > room // 2:
        threads -= 1
    live = live_pieces(threads)
    sub = max(1, min(sub, (room // 2 - live * piece) // (live * compute)))
    block = (room - live * (sub * compute + piece)) // per_row
    return max(1, min(task.rows, block)), max(1, min(sub, block, task.rows)), threads


def held_bytes(task: Task) -> int:
    """Bytes the op keeps between passes over the whole tensor when told to (hold_state)."""
    return 0 if task.copy_exact else int(task.rows * task.cols * task.cost.held_per_element)


def fits_whole(task: Task, budget_bytes: int, threads: int = 1) -> bool:
    """The task is read in one block within `budget_bytes`."""
    return chunk_rows(task, budget_bytes, threads=threads)[0] >= task.rows


def hold_reserve(tasks: Sequence[Task], budget_bytes: int, threads: int = 1) -> int:
    """Bytes set aside from the chunk budget for the state of tasks read in several blocks: the
    largest such task's that is at most HOLD_SHARE of the budget and leaves every task that fits
    whole still whole (a tensor read twice costs more than masks drawn twice); 0: none is kept, or
    what is left would not hold one row of the widest task."""
    fits = [fits_whole(t, budget_bytes, threads) for t in tasks]
    whole = [t for t, f in zip(tasks, fits) if f]
    held = {held_bytes(t) for t, f in zip(tasks, fits) if not f}
    for r in sorted((h for h in held if 0 < h <= budget_bytes * HOLD_SHARE), reverse=True):
        if all(fits_whole(t, budget_bytes - r, threads) for t in whole):
            widest = max(row_cost(t) for t in tasks)
            return r if budget_bytes - r >= widest else 0
    return 0


def block_bytes(task: Task, rows: int, sub: int, threads: int = 1) -> int:
    """Bytes a block of `rows` rows holds while computed in sub-chunks of `sub` rows on `threads`."""
    return rows * input_row_bytes(task) + live_pieces(threads) * (sub * compute_row_bytes(task) + piece_bytes(task))


def chunk_bytes_used(task: Task, budget_bytes: int, overlap: bool = False, threads: int = 1) -> int:
    """Bytes one block of `task` holds at its peak within `budget_bytes`."""
    block, sub, threads = chunk_rows(task, budget_bytes, overlap, threads=threads)
    return block_bytes(task, block, sub, threads)


def expected_peak(plan: Plan, budget_bytes: int, baseline: int | None = None, overlap: bool = True,
                  threads: int = 1) -> int:
    """The process's expected peak memory when chunks get `budget_bytes` (with `overlap`, a
    block being read may sit beside the one computing, within the budget)."""
    base = baseline_bytes(plan) if baseline is None else baseline
    chunks = max((chunk_bytes_used(t, budget_bytes, overlap, threads) for t in plan.tasks), default=0)
    if overlap:
        chunks = min(budget_bytes, AHEAD_BLOCKS * chunks)
    return base + HELD_BYTES + int(chunks / CHUNK_SHARE)

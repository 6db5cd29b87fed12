"""Fused CPU kernels for the hottest loops of the DARE and TIES family and SLERP's statistics, and
the per-row tree sums of every method (row_sums) and of the report's figures, when numba is installed.

Imports rng (and numpy, torch); the compiled loops live in _jit.py, imported on first use. The
torch/numpy forms take a pass over memory per operation — ten for a mask's draw and compare, about
twenty-five per element and input for a DARE-TIES sub-chunk — and the pieces they pass between
them fall out of the caches; here one loop does each element's whole work. The bits are the
same (the draw rule, float32 operations in the same order, no fastmath), so every output,
fingerprint and golden record stands, a GPU's torch forms agree with them, and a machine without
numba (or with STREAMMERGE_JIT=0) merges the same bytes, only slower.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from .. import limits
from ..units import size_str
from .rng import _blocks, block_key

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_scratch = threading.local()  # each thread's radix histogram (radix_count), all zeros between calls
_torch_facts: dict[str, str] = {}  # what was asked of this machine's torch once (add_unfused)
_use = {"on": True}  # the merge this process runs uses the loops (use_for); tests call kernels directly

# A merge with fewer float32 element-inputs than this (elements x inputs, over its family tensors)
# runs the torch forms: loading numba and the cached kernels takes ~1 s (on this project's 2-core
# machine), and the loops save 3 (DARE-TIES) to 14 (TIES) ns per element-input, so below ~2^26 (67M) the
# load costs more than it saves. Same bytes either way. The default of MethodDef.jit_min_work: methods
# whose loops save less ask for more (SLIM_WORK, SUM_WORK).
MIN_WORK = 1 << 26
# SLERP's statistics loop and task arithmetic's plain sum save less. SLERP's (one loop for its three
# products' tree sums, with blocks as read and 512K-element sub-chunks) against torch's forms, on the
# medium set (hidden 1024; 2 cores, 512 MiB cap, alternated; merge seconds, numba's load included):
# 2 layers (186M) 1.1-1.2 against 1.0-1.4, 6 layers (300M) 1.2 against 1.4-1.6, 10 layers (430M)
# 1.5-1.9 against 1.9-2.5, 16 layers (567M) 2.0-2.3 against 2.6-3.2. A 3-model task arithmetic
# (850M) merged in 1.6-2.6 s with the loops against 1.7-2.2; a 14-model one (8.1G) in 9.3-10.5 s
# with them against 10.5-12.5.
SLIM_WORK = 1 << 28  # SLERP
# task_arithmetic: its 2-input 1.4G at 7B shapes was still 0.3-1.0 s slower with the loops. linear's
# one loop (merge seconds, loops against torch's forms, alternated, 512 MiB cap, 2 cores; quiet, and
# beside 4 busy processes): 3-model medium (851M) 0.75-0.77 against 0.69-0.70, busy 1.73 against
# 1.39; 5-model medium (1.42G) 0.78-0.90 against 0.78-0.80, busy 1.74-2.18 against 1.83-2.26;
# 3-model 7B shapes (2.10G) 1.17-1.28 against 1.24-1.28, busy 2.68-2.91 against 3.00-3.09;
# 14-model medium (3.97G) 1.46-1.51 against 1.72-1.76, busy 3.66-3.94 against 4.38-4.49.
SUM_WORK = 1 << 31


def use_for(work: int, least: int = MIN_WORK) -> bool:
    """Whether the merge about to run, `work` element-inputs of this family, uses the compiled loops:
    STREAMMERGE_JIT=1 always, =0 never, unset when work >= least (its method's jit_min_work; and
    numba is there)."""
    _use["on"] = wanted(work, least)
    return kernels() is not None


def wanted(work: int, least: int = MIN_WORK) -> bool:
    """use_for's rule without loading anything: STREAMMERGE_JIT=1, or unset and work >= least."""
    mode = os.environ.get("STREAMMERGE_JIT", "")
    return mode == "1" or (mode != "0" and work >= least)


@contextlib.contextmanager
def loops_off() -> Iterator[None]:
    """The loops off for what runs inside (use_none), then as they were: what torch's forms would cost."""
    was = _use["on"]
    _use["on"] = False
    try:
        yield
    finally:
        _use["on"] = was


def importable() -> bool:
    """Whether numba is installed here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def use_none() -> None:
    """The merge this process runs uses no compiled loops (it runs on a GPU, or its method has none)."""
    _use["on"] = False


def loaded() -> ModuleType | None:
    """The compiled kernels' module where the merge this process runs uses them and they are loaded
    already; never loads them (a method without loops of its own asks this, not kernels())."""
    return _state.get("jit") if _use["on"] else None


def kernels() -> ModuleType | None:
    """The compiled kernels' module, or None where numba is missing, STREAMMERGE_JIT=0, or the merge
    is too small to repay loading them (use_for)."""
    if not _use["on"] or os.environ.get("STREAMMERGE_JIT", "") == "0":  # asked each time, not kept with the module
        return None
    if "jit" not in _state:
        with _lock:
            if "jit" not in _state:
                jit: ModuleType | None
                try:
                    with collector_off():
                        from . import _jit as jit
                except ImportError:  # numba missing or broken here: the torch forms do the work
                    jit = None
                except RuntimeError as e:  # numba found no folder to cache the loops in
                    warnings.warn(f"numba cannot load streammerge's loops here ({e}); this merge runs torch's "
                                  "forms instead (the same bytes, slower). Where no folder beside the package "
                                  "or in your home is writable, set NUMBA_CACHE_DIR to one", KernelWarning,
                                  stacklevel=3)
                    jit = None
                _state["jit"] = jit
    return _state["jit"]


class KernelWarning(UserWarning):
    """The compiled loops could not be made ready; the merge runs torch's forms (the same bytes)."""


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector held off, then left as it was; in a process that freezes what
    lives as long as it (the CLI freezes its imports: cli._loaded), everything the collector tracks
    is frozen then too: what numba made, and what the run made since the CLI's freeze (its plan,
    which lives as long as the run; garbage among it would stay until the process ends, as with
    the CLI's own freeze). Importing numba and loading its kernels make objects that live as long
    as the process, and the collector walked them as they came: 153 young, 13 middle and one full
    collection, 30-32 ms of the 0.28-0.32 s they took in a SLERP run (3 runs); held off but not
    frozen, the first two collections after walked them all (22-31 ms). Before a freeze, garbage
    is collected first (what is frozen must be alive: a pipeline's earlier stage leaves cycles,
    its reader's and their staging buffers among them, that only a full collection frees), while
    the unfrozen heap is small: the plan, not numba."""
    was = gc.isenabled()
    if was and gc.get_freeze_count():
        gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count():
                gc.freeze()
            gc.enable()


# The kernels' groups, by who calls them: warm loads a merge's own. "sums": the per-row tree sums
# every method's statistics and report take (row_sums, product_sums); "slerp": SLERP's two loops;
# "family": the task-arithmetic family's draws, ranks, masks and apply. Loading a form once numba is
# up costs a few ms; numba's own start (its import, then its registries with the first kernel) is
# paid whichever. The gradient SLERP's budget.baseline_bytes (that start and the warm), alternated
# in fresh processes on 2 cores: 0.36-0.41 s with its own group against 0.40-0.45 with every one.
GROUPS = ("sums", "slerp", "linear", "family")


def warm(group: str) -> None:
    """Load numba and the kernels of `group` (GROUPS; "sums" with any) as the merge will call them
    (compiled once, then from numba's cache, in the forms its blocks take: float32, and bfloat16
    as read), so that the memory they hold is there before a run measures what it starts from."""
    if kernels() is None:
        return
    if group not in GROUPS:
        raise ValueError(f"unknown group of kernels {group!r}; one of {GROUPS}")
    if not _compiled_ahead(group):
        return
    with collector_off():
        _warm(group)


# Compiling a group is numba's first-run work (on this project's 2-core machine ~12 s for "family"),
# and LLVM keeps what it took: a merge's process that compiled the family (its warm holds the
# collector off) held 272 MiB more anonymous memory than one that loaded the same kernels from
# numba's cache (463 MiB against 191; 279 with the collector on), and malloc_trim gave back 25 of
# them. The first merge after an install measured that as memory the process holds and refused the
# 512 MiB every later run merged in ("use at least 711MiB", 3-model TIES). So the compiling is done
# once in a helper process, which fills numba's cache and leaves a mark beside it; the merge then
# loads the kernels from the cache, as every later run does.
COMPILE_TIMEOUT_S = 600
_COMPILE = r"""
import sys
try:  # a memory cgroup that cannot hold the helper beside the merge kills the helper, not the merge
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
sys.path.insert(0, sys.argv[1])
from streammerge.methods import fused
fused.compile_group(sys.argv[2])
"""


def compile_group(group: str) -> None:
    """Load (compiling where numba's cache lacks them) the kernels of `group` in this process, and
    mark the cache as holding them and the "sums" group that comes with any (the helper process of
    _compiled_ahead runs this)."""
    use_for(0, 0)
    if kernels() is None:
        raise RuntimeError("numba's kernels cannot be loaded in the helper process")
    _warm(group)  # with the collector on: compiling with it off held 463 MiB where this holds 279
    for g in {group, "sums"}:
        mark = _mark(g)
        if mark is not None:  # an empty file, made or left as it is: never truncated, nor a link followed
            os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644))


def _mark(group: str) -> str | None:
    """The file that says numba's cache holds `group`'s kernels for this numba, Python, _jit.py
    (numba's own test: the source's modification time and size) and CPU target; None where numba
    keeps no cache."""
    jit = _state.get("jit")
    assert jit is not None
    disp = jit.tree_rows
    try:
        where = disp.stats.cache_path
        target = disp.targetctx.codegen().magic_tuple()  # what numba keys its cache entries by
    except Exception:  # noqa: BLE001  (numba's internals moved: no mark, compile as before)
        return None
    if not where or jit.__file__ is None:
        return None
    st = os.stat(jit.__file__)
    import numba
    key = repr((numba.__version__, sys.version_info[:2], st.st_mtime, st.st_size, target))
    return os.path.join(where, f"streammerge-{group}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.ready")


def ready(group: str) -> bool:
    """Whether warm(group) loads the loops without compiling them first: numba's cache is marked as
    holding them, or nothing would be compiled (no numba, the loops off, no cache to mark)."""
    return kernels() is None or _missing_mark(group) is None


def _missing_mark(group: str) -> str | None:
    """_mark(group) where that file is not there yet (the loaded kernels' cache lacks the group), else None."""
    mark = _mark(group)
    return mark if mark is not None and not os.path.exists(mark) else None


def _compiled_ahead(group: str) -> bool:
    """Whether numba's cache holds `group`'s kernels, compiling them in a helper process first where it
    has no mark of them (the first merge after an install, or after numba, Python or streammerge
    changed). Where the helper fails, this process turns the loops off: torch's forms merge the same
    bytes, slower; a KernelWarning says why. A helper killed under a memory cgroup's limit is not
    started again under that limit or a smaller one (it would be killed again: under 400 MiB, 7 s
    of a 13 s merge of 3-model TIES, every run); a larger limit, or none, tries again."""
    mark = _missing_mark(group)  # (warm loaded the kernels)
    if mark is None or not sys.executable:
        return True
    limit = limits.cgroup_memory()
    killed_under = _killed_under(mark)
    if limit is not None and killed_under is not None and limit <= killed_under:
        why = (f"a helper compiling them was killed before, out of memory most likely, under a memory limit of "
               f"{size_str(killed_under)}, and this process's limit is {size_str(limit)}: a run with more memory "
               "(a larger limit, or none) compiles them once, for every later run")
        return _loops_off(group, why)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, STREAMMERGE_JIT="1")
    try:
        done = subprocess.run([sys.executable, "-c", _COMPILE, root, group], env=env, capture_output=True,
                              text=True, errors="replace", timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        why = f"it did not finish in {COMPILE_TIMEOUT_S} s"
    except OSError as e:
        why = f"it could not start ({e.strerror or e})"
    else:
        if done.returncode == 0 and os.path.exists(mark):
            with contextlib.suppress(OSError):
                os.unlink(_killed_note(mark))
            return True
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        killed = done.returncode in (-9, 137)
        if killed and limit is not None:
            _note_killed(mark, limit)
        why = ("it was killed, out of memory most likely: a run with more memory free compiles them once, "
               "for every later run" if killed else f"it failed: {tail[0]}")
    return _loops_off(group, why)


def _loops_off(group: str, why: str) -> bool:
    """Say why `group`'s loops are not compiled, and turn the loops off for the rest of this process
    (no merge compiles them in it): False."""
    warnings.warn(f"numba could not compile streammerge's loops ({group}) in a helper process ({why}); "
                  "this merge runs torch's forms instead, the same bytes, slower (STREAMMERGE_JIT=0: "
                  "without trying)", KernelWarning, stacklevel=4)
    with _lock:
        _state["jit"] = None
    return False


def _killed_note(mark: str) -> str:
    """The file beside `mark` that holds the memory limit (bytes) a helper was killed under."""
    return mark.removesuffix(".ready") + ".killed"


def _killed_under(mark: str) -> int | None:
    """The memory limit a helper compiling `mark`'s group was killed under, or None (never, or the
    note unreadable)."""
    try:
        with open(_killed_note(mark)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _note_killed(mark: str, limit: int) -> None:
    """Remember that a helper was killed under the memory limit `limit` (a file of ours beside the
    mark, in numba's cache: never a link followed)."""
    try:
        fd = os.open(_killed_note(mark), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(limit))


def _warm(group: str) -> None:
    x = torch.zeros(3, 1, 8)
    exact_partials(np.zeros(2))
    for dt in (torch.float32, torch.float64):
        tree_sums(x[1].to(dt))
    for xs in (x, x.bfloat16()):  # and blocks as read
        product_sums(xs, xs[0], 0)  # the report's (slerp_sums' loop too)
        if group == "slerp":
            for dt in LOADED:
                weighted_pair(xs[1], xs[2], 0.5, 0.5, dt)
        if group == "linear":
            for dt in LOADED:
                for d in (None, 2.0):
                    linear_sum(xs, np.ones(3, dtype=np.float32), d, dt)
        if group == "family":
            dare_sums(xs, 0, [1, 2], (1, 2), 0, np.full(2, 1 << 31, dtype=np.int64), True)
            task_apply(xs, 0, [1, 2], [torch.ones(1, 8, dtype=torch.bool), None], [1.0, 1.0], [1.0, 1.0], False,
                       True, True, 1.0, 1.0)
            radix_count(xs[1], xs[0], -1)
            ranked_keep(xs[1], 0, 1 << 32, xs[0])
            della_keep(xs[1], 1, 0, 8, np.zeros(8), xs[0], sums=True)
    if group == "family":
        bernoulli(1, 0, 8, 1 << 31)
        radix_count(x[1], None, -1)
        ranked_keep(x[1], 0, 1 << 32)
        codes, ties = ranked_codes(x[1], 0)  # every zero a tie: quota 1 takes the compiled walk
        settle_ties(codes, ties, 1)


# the dtypes the loops load: float32, and bfloat16 widened as each element is loaded (_jit.widen)
LOADED = (torch.float32, torch.bfloat16)


def usable(x: torch.Tensor) -> bool:
    """The fused kernels apply to chunk x (n_inputs, rows, cols): numba present, on the CPU, float32
    (or bfloat16, where an op takes its block as read: MergeOp.takes_raw), each input's rows one
    contiguous run (a sub-chunk's whole rows of a block)."""
    return (x.device.type == "cpu" and x.dtype in LOADED and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and kernels() is not None)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as a numpy view: bfloat16 (which numpy lacks) as its bits, uint16."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _run(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """Chunk x (usable: each input's rows one contiguous run) as one flat numpy view from its first
    input's first element to its last input's last, and the stride between inputs in it: input i's
    rows at [i·stride, i·stride + rows·cols), as the loops that take every input at once index it."""
    n, stride = x.shape[0], x.stride(0)
    return _np(torch.as_strided(x, ((n - 1) * stride + x[0].numel(),), (1,))), stride


def bernoulli(key: int, start: int, count: int, threshold: int) -> np.ndarray | None:
    """rng.bernoulli_mask's CPU keep-mask (draws < threshold) as a bool array, or None without numba."""
    jit = kernels()
    if jit is None:
        return None
    out = np.empty(count, dtype=np.bool_)
    at = 0
    for block, lo, n in _blocks(start, count):
        jit.bernoulli(block_key(key, block), lo, threshold, out[at:at + n])
        at += n
    return out


def _block_keys(key: int, start: int, count: int) -> np.ndarray:
    """keys_of for one key: (blocks,) int64."""
    return keys_of((key,), start, count)[0]


def keys_of(keys: tuple[int, ...], start: int, count: int) -> np.ndarray:
    """rng.block_key of every 2^32 block that elements start .. start + count − 1 touch, for each
    stream key in `keys`: keys_of(...)[j, k] is keys[j]'s key of block (start >> 32) + k (one
    placeholder where count is 0), as the loops index them; (len(keys), blocks) int64. Kept for
    the next sub-chunk: a tensor's sub-chunks (below 2^32 elements: every tensor of a 7B model)
    all touch block 0 alone. The caller must not write to it."""
    first = start >> 32
    last = ((start + count - 1) >> 32) if count else first - 1
    return _keys_of(keys, first, last)


@functools.lru_cache(maxsize=256)
def _keys_of(keys: tuple[int, ...], first: int, last: int) -> np.ndarray:
    blocks = range(first, last + 1)
    return np.array([[block_key(key, blk) for blk in blocks] or [0] for key in keys], dtype=np.int64).reshape(
        len(keys), max(1, len(blocks)))


def dare_sums(x: torch.Tensor, base: int, others: list[int], keys: tuple[int, ...], start: int,
              thresholds: np.ndarray, pack: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """DARE's L1 statistics of inputs `others` of chunk x (usable(x)) whose first flat index is
    start, input others[j]'s mask drawn with stream key keys[j] and kept where the draw <
    thresholds[j] (int64): the row_sums of |x_i − x_base| and of |x_i − x_base|·keep as float64
    (len(others), rows), and with `pack` each mask's bits as np.packbits packs them ((len(others),
    bytes) uint8); in one compiled call for every input, without the float64 arrays of every element."""
    jit = kernels()
    assert jit is not None
    _, rows, cols = x.shape
    count = rows * cols
    xf, stride = _run(x)
    k = len(others)
    total, kept = np.empty((k, rows), dtype=np.float64), np.empty((k, rows), dtype=np.float64)
    packed = np.zeros((k, (count + 7) // 8 if pack else 0), dtype=np.uint8)
    jit.dare_sums(xf, stride, base, np.array(others, dtype=np.int64), keys_of(keys, start, count), start,
                  thresholds, total, kept, packed, cols)
    return total, kept, packed if pack else None


def della_keep(d: torch.Tensor, key: int, start: int, cols: int, prob: np.ndarray, base: torch.Tensor | None = None,
               sums: bool = False) -> tuple[np.ndarray, torch.Tensor, torch.Tensor] | None:
    """RankedDrop's keep-mask (flat bool) of rows of δ = d − base (d itself where base is None;
    float32, or bfloat16 as read; `cols` per row, contiguous) whose first flat index is start, in
    one compiled loop per row (_jit.della_keep: a radix sort for the ranks, then the draws), and
    with `sums` the row sums of |δ| and |δ|·keep as RandomDrop.observe makes them (float64, (rows,);
    else empty); None where the kernels are not loaded."""
    jit = kernels()
    if jit is None:
        return None
    count = d.numel()
    keys = _block_keys(key, start, count)
    out = np.empty(count, dtype=np.bool_)
    rows = count // cols if sums and cols else 0
    total, kept = np.empty(rows, dtype=np.float64), np.empty(rows, dtype=np.float64)
    df = _flat(d)
    jit.della_keep(df, df if base is None else _flat(base), base is None, cols, keys, start, prob, out, total, kept)
    return out, torch.from_numpy(total), torch.from_numpy(kept)


class Draw(NamedTuple):
    """A keep-mask task_apply draws itself, a tile at a time, never stored: rng.bernoulli_mask's of
    the chunk's flat indices with `key`, kept where the draw < `threshold` (rng.keep_threshold)."""

    key: int
    threshold: int


def task_apply(x: torch.Tensor, base: int, others: list[int], keeps: list[torch.Tensor | np.ndarray | Draw | None],
               scales: list[float], weights: list[float], deltas_done: bool, consensus: bool,
               normalize: bool, divisor: float, lam: float, pick: slice | None = None,
               tallied: np.ndarray | None = None, start: int = 0) -> torch.Tensor:
    """TaskArithmetic.apply's arithmetic after the masks, in one loop (_jit.task_apply), on chunk x
    (usable(x); bfloat16 only without `deltas_done`) whose first flat index is `start`: returns the
    merged rows (float32), x as it was. A mask is a bool tensor of the chunk's shape, its bits as
    np.packbits packs them (a uint8 array, DARE's kept masks), or a Draw (DARE's mask where none
    was kept: drawn in the loop, without 1 byte per element and input written and read again).
    With `pick` (rows of the chunk) and `tallied` ((3, len(others)) int64) the report's counts of
    those rows are added to tallied: with consensus each other input's nonzero δ (row 0) and those
    agreeing with the sign (row 1); each Draw's kept elements (row 2)."""
    jit = kernels()
    assert jit is not None
    _, rows, cols = x.shape
    count = rows * cols
    xf, stride = _run(x)
    masked = np.zeros(len(keeps), dtype=np.int8)  # 0 none, 1 a bool row of keep, 2 a row of packed, 3 a draw
    slot = np.zeros(len(keeps), dtype=np.int64)
    keep = np.empty((sum(isinstance(k, torch.Tensor) for k in keeps), count), dtype=np.bool_)
    packed = np.empty((sum(isinstance(k, np.ndarray) for k in keeps), (count + 7) // 8), dtype=np.uint8)
    draws = [k for k in keeps if isinstance(k, Draw)]
    draw_keys = keys_of(tuple(d.key for d in draws), start, count) if draws else np.zeros((0, 1), np.int64)
    thresholds = np.array([d.threshold for d in draws], dtype=np.int64)
    nb = nbits = ndraw = 0
    for j, k in enumerate(keeps):
        if isinstance(k, torch.Tensor):
            masked[j], slot[j] = 1, nb
            keep[nb] = k.numpy().reshape(-1)
            nb += 1
        elif isinstance(k, Draw):
            masked[j], slot[j] = 3, ndraw
            ndraw += 1
        elif k is not None:
            masked[j], slot[j] = 2, nbits
            packed[nbits] = k
            nbits += 1
    with np.errstate(over="ignore", invalid="ignore"):  # a weight beyond float32: inf, and inf·0 NaN, as in torch
        scale = np.array(scales, dtype=np.float32)
        zero = scale * np.float32(0.0)  # keep·scale where dropped: the zero of scale's sign
    out = np.empty(count, dtype=np.float32)
    jit.task_apply(xf, stride, base, np.array(others, dtype=np.int64), keep, packed, masked, slot, draw_keys,
                   thresholds, start, scale, zero, np.array(weights, dtype=np.float32), deltas_done, consensus,
                   normalize, np.float32(divisor), np.float32(lam), lam != 1.0, out, cols,
                   np.array(pick.indices(rows) if pick is not None and tallied is not None else (0, 0, 0),
                            dtype=np.int64),
                   tallied if tallied is not None else np.zeros((3, len(others)), dtype=np.int64))
    return torch.from_numpy(out).view(rows, cols)


def radix_count(x: torch.Tensor, base: torch.Tensor | None,
                hi: int) -> tuple[slice | np.ndarray, np.ndarray, np.ndarray | None]:
    """One of TopK's radix passes over float32 rows x (δ itself when base is None, else x − base):
    (bins, counts, inexact), counts[i] the elements in bin bins[i] (see _jit.radix_count; hi < 0 is
    the first pass) and, in the first pass, inexact[i] how many of them have a bit pattern whose low
    half is not zero (None in the second). The bins are counted in this thread's own histograms, so
    threads never share one, and only the bins touched are copied out and cleared: in the first pass
    the range between the first and the last (|δ| of a tensor spans few exponents), as a slice, in
    the second the bins themselves, as an index array (the low halves spread over all 65,536 bins,
    and copying, clearing and adding the range took a tenth of a 3-model TIES's statistics passes).
    The first pass's range reaches from the zeros' bin to the largest |δ|'s, ~16K bins: an index
    array of them made adding the counts (numpy's gather and scatter) cost as much as counting them."""
    jit = kernels()
    assert jit is not None
    hist = getattr(_scratch, "hist", None)
    if hist is None:
        hist = _scratch.hist = np.zeros(2 << 16, dtype=np.int64)  # the first pass: two per high half
        _scratch.split = np.empty((2, 1 << 16), dtype=np.int64)
        _scratch.touched = np.empty(1 << 16, dtype=np.int64)
    xf = _flat(x)
    first, last, n = jit.radix_count(xf, xf if base is None else _flat(base), base is None, hi, hist,
                                     _scratch.split, _scratch.touched)
    if hi >= 0:
        bins = _scratch.touched[:n].copy()
        counts = hist[bins]
        hist[bins] = 0
        return bins, counts, None
    size = max(0, int(last) - int(first) + 1)
    counts, inexact = _scratch.split[:, :size].copy()
    return slice(int(first), int(first) + size), counts, inexact


def ranked_keep(d: torch.Tensor, above: int, not_above: int,
                base: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
    """(keep, ties) of rows of δ = d − base (d itself where base is None; float32, or bfloat16 as
    read): keep (flat) where above < bits(|δ|) ≤ not_above (TopK's bit patterns), ties the count of
    bits(|δ|) == above."""
    keep, ties = _ranked(d, base, above, not_above, 0)
    return keep.view(np.bool_), ties


def ranked_codes(d: torch.Tensor, tie: int, base: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
    """(codes, ties) of rows of δ = d − base (as ranked_keep): codes (flat uint8) 1 where
    bits(|δ|) > tie, 2 where equal (TopK's threshold ties), else 0; ties the count of 2s.
    settle_ties makes them a keep-mask."""
    return _ranked(d, base, tie, 1 << 32, 2)


def _ranked(d: torch.Tensor, base: torch.Tensor | None, above: int, not_above: int,
            tie_code: int) -> tuple[np.ndarray, int]:
    """_jit.ranked_keep into a new flat uint8 array: (codes, ties)."""
    jit = kernels()
    assert jit is not None
    out = np.empty(d.numel(), dtype=np.uint8)
    df = _flat(d)
    ties = jit.ranked_keep(df, df if base is None else _flat(base), base is None, above, not_above, tie_code, out)
    return out, int(ties)


def settle_ties(codes: np.ndarray, ties: int, quota: int) -> np.ndarray:
    """ranked_codes' codes (of `ties` ties) as a bool keep-mask, in place: the first `quota` ties kept.
    Only the chunk where the quota runs out is walked; the others keep all of theirs or none, a
    vectorized pass (ties to 1 or to 0)."""
    if quota >= ties:  # (numpy's uint8 minimum does not vectorize: 15x the compare)
        np.not_equal(codes, np.uint8(0), out=codes.view(np.bool_))
    elif quota <= 0:
        np.bitwise_and(codes, np.uint8(1), out=codes)
    else:
        jit = kernels()
        assert jit is not None
        jit.settle_ties(codes, quota)
    return codes.view(np.bool_)


def _flat(t: torch.Tensor) -> np.ndarray:
    return _np(t).reshape(-1)


PARTIALS_MAX = 64  # Shewchuk's partials of float64 values: ~40 at most (2,098 bits of exponent / 53)


def exact_partials(values: np.ndarray) -> list[float] | None:
    """A few floats whose math.fsum, with any others, is math.fsum of `values` (float64, one
    dimension): _jit.exact_partials, in place of a Python float per value (base.RowSums). None
    where the kernels are not loaded, or for values the loop leaves to math.fsum (not finite, or
    beyond _jit.PARTIALS_BIG)."""
    jit = loaded()
    if jit is None or values.dtype != np.float64 or values.ndim != 1:
        return None
    out = np.empty(PARTIALS_MAX, dtype=np.float64)
    n = jit.exact_partials(np.ascontiguousarray(values), out)
    return out[:n].tolist() if n >= 0 else None


def tree_sums(x: torch.Tensor) -> torch.Tensor | None:
    """base.tree_row_sums(x) for rows (rows, cols) of float32 or float64 on the CPU, compiled (the
    same bits); None where the kernels are not loaded."""
    jit = loaded()
    if jit is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return None
    out = np.empty(x.shape[0], dtype=np.float64)
    jit.tree_rows(x.contiguous().numpy(), out)
    return torch.from_numpy(out)


def slerp_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(3, rows) float64: the tree_row_sums of a·a, b·b and a·b for rows (rows, cols) of float32, or
    both bfloat16 (each row contiguous), products rounded to float32 as torch's, in one compiled loop (usable):
    product_sums of one input, its rows reordered."""
    sums = product_sums(a[None], b, None)
    assert sums is not None
    return torch.from_numpy(sums[[0, 2, 1]])


def weighted_pair(a: torch.Tensor, b: torch.Tensor, c0: float, c1: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """a·c0 + b·c1 (rows, cols) in `dtype` (float32, or bfloat16: the float32 sum cast, as torch's
    .to casts it, in the same loop) for rows a and b of float32, or both bfloat16 as read, each
    contiguous, c0 and c1 rounded to float32 as torch rounds a scalar factor of a float32 tensor:
    the bits of torch's (a·c0).add_(b·c1) on a and b widened, in one compiled loop. None where the
    kernels are not loaded, or for another dtype."""
    jit = kernels()
    if jit is None or a.dtype not in LOADED or b.dtype != a.dtype or dtype not in LOADED:
        return None
    out = torch.empty(a.shape, dtype=dtype)
    jit.weighted_pair(_flat(a), _flat(b), np.float32(c0), np.float32(c1), _flat(out))
    return out


def linear_sum(x: torch.Tensor, weights: np.ndarray, divisor: float | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Linear.apply's rows (rows, cols) in `dtype` (float32, or bfloat16: cast as torch's .to casts,
    in the same loop) for a chunk x usable here (float32, or bfloat16 as read): Σ x_i·weights[i]
    (float32 weights, torch's fused multiply-adds in input order from a sum of zeros), divided by
    `divisor` (a float32 value) unless it is None, in one compiled loop (_jit.linear_sum). None where
    the kernels are not loaded, or for another dtype."""
    jit = kernels()
    if jit is None or not usable(x) or dtype not in LOADED:
        return None
    assert weights.size == x.shape[0]  # (the loop takes one input per weight)
    span, step = _run(x)
    out = torch.empty(x.shape[1:], dtype=dtype)
    jit.linear_sum(span, step, weights, np.float32(1.0 if divisor is None else divisor),
                   divisor is not None, _flat(out))
    return out


def add_unfused() -> str:
    """Why linear_sum's loop would not give the bits of this machine's torch, in words, or "" where it
    does: it rounds each x·w + sum once (a fused multiply-add), as torch's float32 add_(x, alpha=w)
    does in its AVX2 and AVX-512 kernels, body and tail; its baseline x86 kernels (a CPU without AVX2,
    or ATEN_CPU_CAPABILITY=default) round the product first. Asked of torch itself, once: a sum whose
    product is rounded away (1 + 2^-11 + 2^-24, exact, less 1 + 2^-11) at lengths that take its
    vector body and its tail."""
    if "add_unfused" not in _torch_facts:
        a, b = 1 + 2.0 ** -11, 1 + 2.0 ** -12  # float32 values
        fuses = all(bool((torch.full((n,), -a).add_(torch.full((n,), b), alpha=b) == 2.0 ** -24).all())
                    for n in (1, 17, 67, 1031))
        _torch_facts["add_unfused"] = "" if fuses else (
            "this CPU's torch rounds a product before adding it (no fused multiply-add: "
            f"{torch.backends.cpu.get_cpu_capability()} kernels), which linear's compiled loop does not")
    return _torch_facts["add_unfused"]


def product_sums(x: torch.Tensor, y: torch.Tensor, base: int | None) -> np.ndarray | None:
    """stats.TensorStats' per-row sums of sampled rows x (n, rows, cols) of the inputs and y (rows,
    cols) of the output, float32 on the CPU, in one compiled loop (_jit.product_sums: Σx_i², then
    Σ(x_i − x_base)² where a base is given, Σx_i·y, Σy²: (2n + 1 or 3n + 1, rows) float64, the bits of
    the torch form's products and row_sums); x and y both bfloat16 too. None where the kernels are
    not loaded."""
    jit = loaded()
    if jit is None or x.device.type != "cpu" or x.dtype not in LOADED or y.dtype != x.dtype:
        return None
    n, rows = x.shape[0], x.shape[1]
    out = np.empty(((3 if base is not None else 2) * n + 1, rows), dtype=np.float64)
    jit.product_sums(_np(x.contiguous()), _np(y.contiguous()), -1 if base is None else base, out)
    return out

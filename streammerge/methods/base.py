"""What a merge method is: its contract, parameters, and a per-tensor operation on row chunks.

Imports params, numpy and torch only; methods know nothing about files. The executor feeds an
operation aligned row chunks of all inputs, `x` of shape (n_inputs, rows, cols) in the
compute dtype: first `cost(ctx).stat_passes` statistics passes (observe ... end_pass), then the
apply pass, in row order. Results must not depend on where chunk boundaries fall: every
reduction is exact or made of per-row float64 sums combined with math.fsum.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..params import ParamSpec, Scalar
from . import fused

# Bumped whenever a kernel's output bytes change for the same inputs (a new draw rule, another
# summation order); task fingerprints include it, so a resume never mixes tensors of two rules.
# 4: a merged NaN is written as the one quiet NaN of its dtype (committer.output_rows).
# 5: every per-row float64 sum in the pairwise tree's order on a CPU too (row_sums), not torch's.
ARITHMETIC = 5


@dataclass(frozen=True)
class TaskContext:
    """Everything one output tensor's operation needs to know, resolved at plan time."""

    tensor: str  # output tensor name
    shape: tuple[int, ...]
    base: int | None  # index of the base among the inputs
    input_params: tuple[dict[str, Scalar], ...]  # per input, per-model parameters
    shared: dict[str, Scalar]  # shared parameters
    seed: int = 0
    input_positions: tuple[int, ...] = ()  # position of each input in the config (for RNG keys)

    @property
    def n_inputs(self) -> int:
        return len(self.input_params)

    @property
    def others(self) -> list[int]:
        """Indices of the non-base inputs, in config order."""
        return [i for i in range(self.n_inputs) if i != self.base]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Cost:
    """What merging one tensor costs, declared by its method before any kernel exists."""

    stat_passes: int  # statistics passes before the apply pass
    # compute-dtype rows the kernel holds beyond its inputs, per row of the sub-chunk it is given,
    # at its peak in any pass (measured in a fresh process per kernel, rounded up): budget.py
    # counts block rows · cols · n_inputs for the inputs plus sub-chunk rows · cols · temp_rows
    temp_rows: float = 1.0
    # bytes per element of one input row kept between passes when the tensor is read once, or
    # when budget.hold_reserve sets them aside (hold_state: DARE's packed keep-masks)
    held_per_element: float = 0.0
    # passes (statistics passes and the apply pass) whose op takes a bfloat16 block as read where
    # the compiled loops are in use (MergeOp.takes_raw says so for each; budget.block_dtype)
    raw_passes: int = 0
    # temp_rows where the compiled loops compute every pass of a float32 merge (None: as temp_rows)
    loop_temp_rows: float | None = None
    # the statistics passes find the same whatever order the blocks come in (exact sums, counts,
    # state kept by position; no InOrder section): a tensor read in several blocks then runs every
    # other pass backwards, so each pass begins with the block the pass before it ended with and
    # that block is read once for both (schedule.pass_steps)
    any_order: bool = False


def fixed_cost(stat_passes: int, temp_rows: float, any_order: bool = False) -> Callable[[TaskContext], Cost]:
    """A method whose cost does not depend on its parameters."""
    cost = Cost(stat_passes, temp_rows, any_order=any_order)
    return lambda ctx: cost


def no_problems(ctx: TaskContext) -> list[str]:
    return []


def loops_match_everywhere() -> str:
    """MethodDef.jit_mismatch for loops that give torch's bits on every CPU: no reason."""
    return ""


class Tally:
    """Counts a method keeps for the report, per input, over the rows `pick` selects in the chunk
    it is given (the runner sets it: a fixed sample of rows, see stats.py): elements of its delta
    seen and kept by sparsification, and of its nonzero delta how many agree with the elected sign
    (None where the method does not sparsify or elect). Threads computing sub-chunks at once each
    have their own `pick`; the counts are added under a lock."""

    def __init__(self, n_inputs: int) -> None:
        self.used = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self.seen: list[int | None] = [None] * n_inputs
        self.kept: list[int | None] = [None] * n_inputs
        self.agree: list[int | None] = [None] * n_inputs
        self.nonzero: list[int | None] = [None] * n_inputs

    @property
    def pick(self) -> slice | None:
        """Rows of this thread's current chunk to count (None: none)."""
        return getattr(self._local, "pick", None)

    @pick.setter
    def pick(self, rows: slice | None) -> None:
        self._local.pick = rows

    def add(self, counts: list[int | None], i: int, n: int) -> None:
        with self._lock:
            self.used = True
            counts[i] = (counts[i] or 0) + n

    def count(self, counts: list[int | None], i: int, x: torch.Tensor | None, rows_of: torch.Tensor) -> None:
        """Add the nonzero elements of x's picked rows (x None: every picked element of rows_of,
        a (rows, cols) chunk)."""
        pick = self.pick
        if pick is None:
            return
        if x is None:
            self.add(counts, i, len(range(*pick.indices(rows_of.shape[0]))) * rows_of.shape[1])
        else:  # a strided view: index_select's copy of the rows was a tenth of a DARE-TIES merge
            self.add(counts, i, _count(x[pick]))

    def count_each(self, counts: list[int | None], inputs: list[int], x: torch.Tensor, positive: bool = False) -> None:
        """count for several inputs at once: x (len(inputs), picked rows, cols), its nonzero (or
        positive) elements counted per input in one call, where one call per input cost more."""
        if self.pick is None:
            return
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            a = x.numpy()
            per = np.count_nonzero(a > 0 if positive else a != 0, axis=(1, 2)).tolist()
        else:
            per = torch.count_nonzero(x > 0 if positive else x, dim=(1, 2)).tolist()
        self.add_each(counts, inputs, per)

    def add_each(self, counts: list[int | None], inputs: list[int], per: list[int]) -> None:
        """Add per[k] to input inputs[k]'s count."""
        with self._lock:
            self.used = True
            for i, n in zip(inputs, per):
                counts[i] = (counts[i] or 0) + int(n)


def _count(x: torch.Tensor) -> int:
    """Nonzero elements of x. On a CPU by numpy: torch's count_nonzero cost 18 µs on 16 rows of
    1024, numpy's compare and count 9 (3 for bools)."""
    if x.device.type == "cpu" and x.dtype in (torch.bool, torch.float32, torch.float64):
        a = x.numpy()
        return int(np.count_nonzero(a if a.dtype == np.bool_ else a != 0))
    return int(torch.count_nonzero(x))


class Aborted(Exception):
    """A sub-chunk before this one failed, so its turn in an ordered section never comes."""


class InOrder:
    """A short section that the threads computing one pass's sub-chunks enter in flat-index order
    (TopK counts threshold ties in order): `with order.turn(flat0, n):` waits until the section
    ran for every element before flat0. `restart` begins a new pass; `abort` wakes every waiter
    with Aborted (a sub-chunk failed, so the next turn never comes)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next = 0
        self._aborted = False

    def restart(self) -> None:
        with self._cv:
            self._next = 0

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify_all()

    @contextmanager
    def turn(self, flat0: int, count: int) -> Iterator[None]:
        with self._cv:
            while self._next != flat0 and not self._aborted:
                self._cv.wait()
            if self._aborted:
                raise Aborted
            yield
            self._next = flat0 + count
            self._cv.notify_all()


class MergeOp:
    """One output tensor's merge, fed row chunks. Subclasses override what they need; the
    number of statistics passes is the method's `cost(ctx).stat_passes`. A method that sparsifies
    or elects signs counts what it kept into `tally` when the runner gives it one.

    Threads: the runner calls `observe` and `apply` for several sub-chunks of a pass at once, on
    its compute threads, unless `parallel` is False. What they add to the op's state must then be
    the same whatever the order (RowSums' exact sums, integer counts under a lock), and a section
    that needs row order takes its turn (InOrder; `abort` wakes its waiters)."""

    tally: Tally | None = None
    # the dtype the output is written in (the runner says): apply may give its rows in it already,
    # cast as torch's .to casts, where its loop does that in the same pass; else the runner casts
    out: torch.dtype = torch.float32
    parallel = True  # False: sub-chunks are given one at a time, in row order

    def abort(self) -> None:
        """A sub-chunk failed: wake threads waiting for their turn in an ordered section."""

    def hold_state(self) -> None:
        """Keep per-element state from the statistics passes for the apply pass: the runner says
        so when the apply pass sees the very same block (the method's cost counts its bytes)."""

    def takes_raw(self, pass_idx: int, x: torch.Tensor) -> bool:
        """Whether pass `pass_idx` (the apply pass when it is the method's stat_passes) takes the
        sub-chunks of block x (bfloat16 models' rows, as read) as they are, not widened to float32:
        where its compiled loops load them (fused.LOADED: each element widened as it is loaded, to
        the same value), the widened copy of every sub-chunk — twice its bytes, written, then read
        again — is not made. Asked once per pass and block."""
        return False

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        """Statistics pass `pass_idx` sees rows row0.. of every input; must not modify x."""

    def needs_pass(self, pass_idx: int) -> bool:
        """Whether statistics pass `pass_idx` has anything to see, asked once the pass before it
        ended: False when what it would find is known already (the runner then gives it no rows,
        and still calls end_pass)."""
        return True

    def end_pass(self, pass_idx: int) -> None:
        """Statistics pass `pass_idx` has seen every row."""

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        """The merged rows (rows, cols) for input rows x (n, rows, cols), in the compute dtype or in
        `out`; may overwrite x."""
        raise NotImplementedError


@dataclass(frozen=True)
class MethodDef:
    """A registered merge method: name, parameters, input contract, and its operation."""

    name: str
    params: tuple[ParamSpec, ...]
    base: Literal["required", "optional", "ignored"]
    min_inputs: int
    max_inputs: int | None
    make: Callable[[TaskContext], MergeOp] = field(compare=False)
    cost: Callable[[TaskContext], Cost] = field(compare=False, default=fixed_cost(0, 1.0))
    # problems with one tensor's resolved parameters, found at plan time (shape-dependent rules)
    check: Callable[[TaskContext], list[str]] = field(compare=False, default=no_problems)
    min_others: int = 0  # non-base inputs required
    # its float32 CPU kernels run as compiled loops (fused.py) where numba is installed: whoever
    # measures the memory a run starts from loads them first (budget.baseline_bytes, fused.warm)
    jit: bool = False
    # the group of compiled kernels its merges call (fused.GROUPS), the ones fused.warm loads for it
    jit_loops: str = "family"
    # why its loops would not give the bits of this machine's torch forms, in words ("" where they do):
    # asked before they are chosen (budget.loops_for), which they then are not
    jit_mismatch: Callable[[], str] = field(compare=False, default=loops_match_everywhere)
    # the element-inputs (elements x inputs over the tensors it computes) from which its loops repay
    # loading numba and the kernels (about 0.6-0.9 s here, and a smaller block budget under a cap):
    # fused.MIN_WORK where they save 3-14 ns per element-input; more where they save less (SLERP's one
    # statistics loop, task arithmetic's plain sum), measured per method. Same bytes either way.
    jit_min_work: int = fused.MIN_WORK
    max_others: int | None = None
    # its kernels cost less per element than reading the inputs: on fewer cores than
    # executor.OVERLAP_MIN_CORES (but more than one) a run reads ahead on a thread of its own
    # beside one compute thread (executor.default_overlap), measured faster quiet and beside busy
    # processes (linear, slerp, task_arithmetic, passthrough); a method that computes more is slower so
    io_bound: bool = False
    pretty: str = ""
    url: str = ""

    @property
    def specs(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}


class RowSums:
    """A whole-tensor float64 sum made chunk-independent: per-row sums, combined by fsum."""

    def __init__(self) -> None:
        self._parts: list[float] = []
        self._rows: list[np.ndarray] = []  # CPU row sums not yet in _parts

    def add(self, row_sums: torch.Tensor) -> None:
        """Add per-row sums (rows,) float64 (on the CPU kept as an array, 8 bytes a row, until total)."""
        if row_sums.device.type == "cpu" and row_sums.dtype == torch.float64:
            self._rows.append(np.array(row_sums.numpy(), copy=True))
        else:
            self._parts.extend(row_sums.tolist())

    def add_rows(self, row_sums: np.ndarray) -> None:
        """add for a float64 array (rows,) that is the caller's to give away: kept as it is, no copy."""
        self._rows.append(row_sums)

    def total(self) -> float:
        """fsum of every row sum added; where the compiled loops are loaded, of a few exact partials
        of the CPU's (fused.exact_partials) in place of a Python float per row (a DARE-TIES of 15
        medium models added 6.6M of them: 0.25 s holding Python's lock, which compute threads wait for)."""
        if self._rows:
            rows = np.concatenate(self._rows)
            self._rows = []
            parts = fused.exact_partials(rows)
            self._parts.extend(parts if parts is not None else rows.tolist())
        return exact_total(self._parts)


def exact_total(parts: Iterable[float]) -> float:
    """math.fsum of per-row sums: exact, in any order; where they hold both +inf and -inf (rows of
    values whose products overflow float32, or infinite inputs) NaN, as adding them gives — fsum
    itself raises ValueError there."""
    try:
        return math.fsum(parts)
    except ValueError:
        return math.nan


def majority_sign(total: torch.Tensor) -> torch.Tensor:
    """+1 where total >= 0 (zero counts as +), else -1, in total's dtype. (torch.where with
    scalar branches took 3x as long as this on 128K elements.)"""
    return (total >= 0).to(total.dtype).mul_(2).sub_(1)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of x (rows, cols) in float64, in tree_row_sums' fixed order on every device.

    The order is the pairwise tree of elementwise adds, each one IEEE-rounded, so a row's sum is
    the same whatever the chunk, the instruction set and the device (torch's own reductions change
    their order with both: AVX2 against AVX-512, a GPU's with the tensor's shape). On a CPU whose
    merge has the compiled kernels loaded one loop does it (fused.tree_sums: 0.5-1 against 1.4-1.8
    ns per element for the torch form here), with the same bits.
    """
    if x.device.type == "cpu":
        got = fused.tree_sums(x)
        if got is not None:
            return got
    return tree_row_sums(x)


# Up to this many elements a CPU tensor's tree is added by numpy: a level costs ~1.5 us there against
# ~15 us in torch (three ops of Python dispatch), and a row of 1024 takes ten levels; above it,
# numpy copies the second half first (its views of one buffer may overlap), and torch is faster.
NUMPY_TREE_MAX = 1 << 16


def tree_row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row float64 sums in a fixed order: columns padded with zeros to a power of two,
    then the second half added to the first until one column is left (in place, in one buffer)."""
    rows, n = x.shape
    if n == 0:
        return torch.zeros(rows, dtype=torch.float64, device=x.device)
    width = 1 << (n - 1).bit_length()
    if x.device.type == "cpu" and rows * width <= NUMPY_TREE_MAX:
        a = np.zeros((rows, width), dtype=np.float64)
        a[:, :n] = x.numpy()
        with np.errstate(all="ignore"):  # inf − inf is NaN, a sum past float64's range inf, as in torch: no warning
            while width > 1:
                width //= 2
                np.add(a[:, :width], a[:, width:2 * width], out=a[:, :width])
        return torch.from_numpy(a[:, 0].copy())
    y = torch.empty(rows, width, dtype=torch.float64, device=x.device)
    y[:, :n].copy_(x)
    y[:, n:].zero_()
    while width > 1:
        width //= 2
        y[:, :width] += y[:, width:2 * width]
    return y[:, 0].clone()

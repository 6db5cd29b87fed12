"""Sparsifiers of task vectors, streamed: exact top-k by magnitude, DARE random drop, L1 rescale.

Imports base and rng (and torch). Each sparsifier is a small state machine over one
input's delta rows: statistics passes (`observe`, `end_pass`), then `mask` for a chunk.

Exact top-k (SEMANTICS deviation 3): |δ| as float32 has a bit pattern that orders like
the value, so a two-pass radix selection finds the k-th largest exactly: pass 1 counts
the high 16 bits, pass 2 the low 16 bits inside the bin holding the k-th element. Among
elements equal to the threshold the lowest flat indices are kept, so exactly k survive;
the apply pass counts the threshold ties seen so far, in row order: threads computing
sub-chunks at once take turns for that count alone (InOrder), and only when some but not all
ties are kept.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from . import fused
from .base import InOrder, RowSums, row_sums
from .rng import bernoulli_mask, draws32

_BINS = 1 << 16
_BATCH = 1 << 16  # chunks with fewer values than this are counted together


QUIET_NAN = 0x7FC00000  # every NaN's magnitude: above +inf, the same whatever its payload


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|δ| rounded to float32, as int32 bit patterns that order like the magnitudes (sign bit clear);
    every NaN as QUIET_NAN. Which payload x − base carries when both are NaN follows the
    instruction (x86 and numba's loops differ), so NaNs rank as ties, by flat index like the rest.
    (A NaN δ makes its output element NaN whether kept or dropped; only which one counts as kept
    in the report could differ.)"""
    mag = delta.abs()
    bits = (mag if mag.dtype == torch.float32 else mag.to(torch.float32)).view(torch.int32)
    return bits.masked_fill_(bits > 0x7F800000, QUIET_NAN)


def scaled_keep(keep: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask as values keep·scale of a compute dtype (float32 or float64): scale where kept,
    a zero of scale's sign where dropped. δ·(keep·scale) is (δ·keep)·scale bit for bit (x·1 is x,
    ±0·s is the zero that product would give, inf·0 the same NaN), in one multiplication.

    On a CPU numpy makes the float32 values from the bools in one pass; torch's bool-to-float cast
    alone took three times as long (0.85 ns per element).
    """
    if keep.device.type == "cpu" and dtype == torch.float32:
        out = np.empty(keep.shape, dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # inf·0 is NaN, as in torch, and said by no one
            np.multiply(keep.contiguous().numpy(), np.float32(scale), out=out)
        return torch.from_numpy(out)
    return keep.to(dtype).mul_(scale)


def keep_scaled_(delta: torch.Tensor, keep: torch.Tensor | None, scale: float) -> None:
    """delta ← (delta·keep)·scale in place (keep None: everything kept). With scale 1 on a CPU,
    numpy multiplies float32 by the bools in one pass (a bool is 1.0 or 0.0 there too)."""
    if keep is None:
        delta.mul_(scale)
    elif scale == 1.0 and delta.device.type == "cpu" and delta.dtype == torch.float32 and delta.is_contiguous():
        d = delta.numpy()
        with np.errstate(invalid="ignore"):  # an input's inf·0 is NaN, as in torch: no RuntimeWarning
            np.multiply(d, keep.contiguous().numpy(), out=d)
    else:
        delta.mul_(scaled_keep(keep, scale, delta.dtype))


def l1_factor(total: float, kept: float) -> float:
    """L1 rescale: Σ|δ| / Σ|δ⊙mask|, or 1 when either is below 1e-7 (SEMANTICS §2.8)."""
    return 1.0 if total < 1e-7 or kept < 1e-7 else total / kept


class Sparsifier:
    """No sparsification: keep everything, factor 1."""

    stat_passes = 0
    factor = 1.0

    def observe(self, pass_idx: int, delta: torch.Tensor, flat0: int) -> None:
        pass

    def observe_inputs(self, pass_idx: int, x: torch.Tensor, base: torch.Tensor, flat0: int) -> None:
        """observe the δ = x − base of input rows x and base rows base."""
        self.observe(pass_idx, x - base, flat0)

    def takes_raw(self, pass_idx: int) -> bool:
        """Where the compiled loops are in use (fused.usable), whether statistics pass `pass_idx` (below
        stat_passes), or the apply pass's fused.task_apply, takes input rows as read (bfloat16): this
        sparsifier's loops load them themselves, and its mask does not look at δ."""
        return True

    def needs_pass(self, pass_idx: int) -> bool:
        """Whether statistics pass `pass_idx` has anything to count: False when what it would find is
        known already (TopK: the first pass found the threshold). Asked once the pass before ended."""
        return True

    def end_pass(self, pass_idx: int) -> None:
        pass

    def mask(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Keep-mask for delta rows starting at flat index flat0 (given `base`, delta holds the input's
        rows as read and δ = delta − base); None = keep all."""
        return None

    def abort(self) -> None:
        """Wake threads waiting for their turn (MergeOp.abort)."""


class TopK:
    """Exact selection of the k largest |δ| (ties: lower flat index first), by radix passes.

    Passes 0 and 1 find the threshold; `mask` then keeps the elements above it and the first
    `ties_keep` equal to it, counting ties seen so far, so chunks must come in row order.
    `k` may be set as late as the end of pass 0 (SCE learns it from the first pass). `observe`
    and `mask` may run on several threads at once.
    """

    passes = 2

    def __init__(self, k: int | None) -> None:
        self.k = k
        self._hist = np.zeros(_BINS, dtype=np.int64)
        self._touched = [_BINS, 0]  # the bins [lo, hi) counted in this pass may be nonzero
        self.high_bin = 0  # pass 1 counts the low halves of the bit patterns whose high half is this
        self._need = 0  # elements still to select inside the threshold's high bin
        self.threshold = 0  # int bit pattern of the k-th largest |δ|
        self.ties_keep = 0
        self.ties_total = 0  # elements equal to the threshold
        self._ties_seen = 0
        # first pass: per high bin, the elements whose low half is not zero (None: not counted)
        self._inexact: np.ndarray | None = np.zeros(_BINS, dtype=np.int64)
        self.found = False  # the first pass found the threshold: the second has nothing to count
        self._lock = threading.Lock()
        self._small: list[torch.Tensor] = []  # values of small chunks not yet counted
        self._small_n = 0
        self.order = InOrder()

    def observe(self, pass_idx: int, bits: torch.Tensor) -> None:
        """`bits`: magnitude_bits of a chunk."""
        if pass_idx == 0:
            self._inexact = None  # (the torch form does not count them)
        values = (bits >> 16).flatten() if pass_idx == 0 else bits[(bits >> 16) == self.high_bin] & 0xFFFF
        if values.numel() >= _BATCH:
            hist = torch.bincount(values, minlength=_BINS).cpu().numpy()
            with self._lock:
                self._hist += hist
                self._touched[:] = [0, _BINS]
            return
        with self._lock:  # a few values: binned with others (a 65536-bin count per small chunk costs more)
            self._small.append(values.cpu())
            self._small_n += values.numel()
            if self._small_n >= _BATCH:
                self._flush()

    def count(self, bins: slice | np.ndarray, counts: np.ndarray, inexact: np.ndarray | None = None) -> None:
        """Add counts of the bins `bins` (a range, or an index array naming each bin once) made
        elsewhere (fused.radix_count) to this pass's histogram; in the first pass `inexact`, how
        many of them have a bit pattern whose low half is not zero (None: not counted)."""
        if isinstance(bins, slice):
            lo, hi = bins.start, bins.stop
        else:
            lo, hi = (int(bins.min()), int(bins.max()) + 1) if bins.size else (_BINS, 0)
        with self._lock:
            self._hist[bins] += counts
            if lo < hi:
                self._touched[:] = [min(self._touched[0], lo), max(self._touched[1], hi)]
            if self._inexact is not None:  # (the first pass: end_pass(0) drops them)
                if inexact is None:
                    self._inexact = None
                else:
                    self._inexact[bins] += inexact

    def _flush(self) -> None:
        if self._small:
            self._hist += torch.bincount(torch.cat(self._small), minlength=_BINS).numpy()
            self._touched[:] = [0, _BINS]
        self._small, self._small_n = [], 0

    def end_pass(self, pass_idx: int) -> None:
        """Select from this pass's counts, which it clears: only the range of bins counted is looked
        at (the first pass fills ~16K of the 65,536), and summed from the bottom (on the thread every
        compute thread waits for, copying and clearing all of them and summing them from the top,
        a reversed view, took 0.2 ms a call)."""
        assert self.k is not None
        self._flush()
        lo, hi = self._touched
        self._touched[:] = [_BINS, 0]
        hist = self._hist[lo:hi].copy()
        self._hist[lo:hi] = 0
        if self.k <= 0:
            self.threshold, self.ties_keep, self._inexact = 1 << 31, 0, None  # above every bit pattern: keep nothing
            return
        if self.found:
            return  # the first pass found the threshold (and the second counted nothing)
        b, above, inside = _select_from_top(hist, self.k if pass_idx == 0 else self._need, lo)
        if pass_idx == 0:
            self.high_bin, self._need = b, self.k - above
            # The elements of the threshold's high bin whose low half is zero all have one bit
            # pattern, the bin's lowest: with fewer than `need` others in the bin (the rest, each
            # above it), the threshold is that pattern, and the second pass would only count what
            # is known. δ of bfloat16 or float16 models has few significant bits: almost always so.
            counted, self._inexact = self._inexact, None
            if counted is not None:
                c = int(counted[b])
                if c < self._need <= inside:
                    self.threshold, self.ties_keep, self.ties_total = b << 16, self._need - c, inside - c
                    self.found = True
        else:
            self.threshold = (self.high_bin << 16) | b
            self.ties_keep = self._need - above
            self.ties_total = inside

    def keeps_above(self) -> int | None:
        """The mask as bits > this value, or None where only some threshold ties are kept (and
        the mask must count them in row order: `mask`)."""
        if self.threshold >= 1 << 31:
            return 1 << 31  # above every bit pattern of a magnitude: nothing
        if self.ties_keep == 0 or self.ties_keep >= self.ties_total:
            return self.threshold - 1 if self.ties_keep else self.threshold
        return None

    def mask_fused(self, d: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> np.ndarray:
        """`mask` of δ rows d − base (d itself where base is None; on the CPU, numba present) in
        compiled loops, flat: no bit patterns made; the ties are counted and taken in turn as `mask`
        does."""
        above = self.keeps_above()
        if above is not None:
            return fused.ranked_keep(d, above, 1 << 32, base)[0]
        codes, n = fused.ranked_codes(d, self.threshold, base)
        with self.order.turn(flat0, d.numel()):  # the ties before this chunk are counted
            seen = self._ties_seen
            self._ties_seen += n
        return fused.settle_ties(codes, n, self.ties_keep - seen)

    def mask(self, bits: torch.Tensor, flat0: int) -> torch.Tensor:
        """Keep-mask of the chunk of bits starting at flat index flat0."""
        if self.threshold >= 1 << 31:
            return torch.zeros_like(bits, dtype=torch.bool)
        if self.ties_keep == 0 or self.ties_keep >= self.ties_total:  # no tie, or every tie, is kept
            return bits >= self.threshold if self.ties_keep else bits > self.threshold
        keep = bits > self.threshold
        ties = bits == self.threshold
        n = int(ties.sum())
        with self.order.turn(flat0, bits.numel()):  # the ties before this chunk are counted
            seen = self._ties_seen
            self._ties_seen += n
        if self.ties_keep > seen:
            # the lowest flat indices among the ties are kept (SEMANTICS deviation 3)
            rank = torch.cumsum(ties.flatten(), 0).view(ties.shape) + seen
            keep |= ties & (rank <= self.ties_keep)
        return keep

    def restart(self) -> None:
        """Count ties from the first chunk again (a new pass over the tensor)."""
        self._ties_seen = 0
        self.order.restart()


class Ranked(Sparsifier):
    """Keeps elements by magnitude rank: TIES's top k, breadcrumbs's band, with optional L1 rescale.

    A band keeps descending ranks [skip, skip + keep): the top (skip + keep) minus the top skip.
    Passes: two radix passes select; with rescale a third sums the kept |δ|.
    """

    def __init__(self, keep: int, skip: int, numel: int, rescale: bool) -> None:
        self.zero_all = keep <= 0 or numel == 0
        self.keep_all = skip == 0 and keep >= numel and not self.zero_all
        self.rescale = rescale
        self.selectors = [TopK(skip + keep)] + ([TopK(skip)] if skip > 0 else [])
        self.stat_passes = self.passes(keep, skip, numel, rescale)
        self._total = RowSums()  # Σ|δ|
        self._kept = RowSums()  # Σ|δ⊙mask|

    @staticmethod
    def passes(keep: int, skip: int, numel: int, rescale: bool) -> int:
        """Statistics passes a band needs: none when it keeps all or nothing."""
        zero_all = keep <= 0 or numel == 0
        keep_all = skip == 0 and keep >= numel and not zero_all
        return 0 if (zero_all or keep_all) else (3 if rescale else 2)

    def observe_inputs(self, pass_idx: int, x: torch.Tensor, base: torch.Tensor, flat0: int) -> None:
        """With numba, the radix passes count δ's magnitudes in one compiled loop (fused.radix_count),
        without making δ, |δ| or its bit patterns; the same counts as observe's."""
        if pass_idx >= 2 or self.rescale or not fused.usable(x.unsqueeze(0)):
            return super().observe_inputs(pass_idx, x, base, flat0)
        if pass_idx == 0:  # every selector counts the same high halves
            bins, counts, inexact = fused.radix_count(x, base, -1)
            for sel in self.selectors:
                sel.count(bins, counts, inexact)
            return
        for sel in self.selectors:
            if not sel.found:
                sel.count(*fused.radix_count(x, base, sel.high_bin)[:2])

    def needs_pass(self, pass_idx: int) -> bool:
        return pass_idx != 1 or not all(sel.found for sel in self.selectors)

    def takes_raw(self, pass_idx: int) -> bool:
        # the apply pass's masks (mask, given the base); the radix passes, not rescale's L1 pass
        return pass_idx >= self.stat_passes or (pass_idx < 2 and not self.rescale)

    def observe(self, pass_idx: int, delta: torch.Tensor, flat0: int) -> None:
        if pass_idx == 2:
            keep = self.mask(delta, flat0)
            assert keep is not None  # pass 2 runs only when selecting
            self._kept.add(row_sums(delta.abs() * keep))
            return
        bits = magnitude_bits(delta)
        for sel in self.selectors:
            if pass_idx == 0 or not sel.found:
                sel.observe(pass_idx, bits)
        if pass_idx == 0 and self.rescale:
            self._total.add(row_sums(delta.abs()))

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 2:
            self.factor = l1_factor(self._total.total(), self._kept.total())
        else:
            for sel in self.selectors:
                sel.end_pass(pass_idx)
        if pass_idx >= 1:
            for sel in self.selectors:
                sel.restart()  # the next pass (rescale or apply) counts ties from the start

    def mask(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Keep-mask of δ rows `delta`; where `base` is given, of δ = delta − base, input rows and
        base rows (fused.usable: float32 or bfloat16 as read), made in the compiled loops without δ."""
        if self.keep_all:
            return None
        if self.zero_all:
            return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
        if base is not None or fused.usable(delta.unsqueeze(0)):  # with numba: compiled loops over δ
            return torch.from_numpy(self._mask_fused(delta, flat0, base)).view(delta.shape)
        bits = magnitude_bits(delta)
        keep = self.selectors[0].mask(bits, flat0)
        if len(self.selectors) > 1:
            keep &= ~self.selectors[1].mask(bits, flat0)
        return keep

    def _mask_fused(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> np.ndarray:
        top = self.selectors[0]
        if len(self.selectors) == 1:
            return top.mask_fused(delta, flat0, base)
        above, not_above = top.keeps_above(), self.selectors[1].keeps_above()
        if above is not None and not_above is not None:  # a band without ties to count: one loop
            return fused.ranked_keep(delta, above, not_above, base)[0]
        keep = top.mask_fused(delta, flat0, base)
        keep &= ~self.selectors[1].mask_fused(delta, flat0, base)
        return keep

    def abort(self) -> None:
        for sel in self.selectors:
            sel.order.abort()


def magnitude_band(density: float, numel: int) -> tuple[int, int]:
    """TIES: (keep, skip) = the k = max(1, floor(density·N)) largest; density >= 1 keeps all, <= 0 none."""
    if density >= 1:
        return numel, 0
    return (0 if density <= 0 else max(1, math.floor(density * numel))), 0


def outlier_band(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Breadcrumbs: (keep, skip): drop the `bot` smallest and the largest above them, keep floor(density·N)."""
    if density >= 1:
        return numel, 0
    keep = math.floor(density * numel)
    top = math.floor(gamma * numel)
    bot = max(0, numel - keep - top)
    return keep, numel - bot - keep


def _select_from_top(hist: np.ndarray, need: int, lo: int = 0) -> tuple[int, int, int]:
    """(bin, above, inside): the bin holding the need-th largest element (need >= 1), how many lie
    in higher bins and how many in it, of the counts hist[i] of bins lo + i (every other bin empty);
    where there are fewer than need, bin 0, every element and bin 0's. Summed from the bottom, a
    contiguous pass: numpy's cumsum of a reversed view took 4x as long."""
    below = np.cumsum(hist)  # below[i]: elements in bins <= lo + i
    total = int(below[-1]) if len(below) else 0
    if total < need:
        return 0, total, int(hist[0]) if lo == 0 and len(hist) else 0
    i = int(np.searchsorted(below, total - need, side="right"))  # the last bin with need at or above it
    return lo + i, total - int(below[i]), int(hist[i])


class RandomDrop(Sparsifier):
    """DARE: keep each element with probability density (counter-based draws); L1 rescale.

    With `remember`, the statistics pass keeps each chunk's mask bit-packed (1/8 byte per
    element) for the apply pass, which then need not draw again: the executor sets it when the
    apply pass will see the very same chunks, and counts the bytes in the budget.
    """

    def __init__(self, density: float, key: int, rescale: bool) -> None:
        self.density = density
        self.key = key
        self.keep_all = density >= 1
        self.zero_all = False
        self.rescale = rescale and not self.keep_all
        self.stat_passes = self.passes(density, rescale)
        self._total = RowSums()
        self._kept = RowSums()
        self.remember = False
        self._packed: dict[int, np.ndarray] = {}

    @staticmethod
    def passes(density: float, rescale: bool) -> int:
        """One statistics pass (the L1 sums) when rescaling a mask that drops anything."""
        return 1 if rescale and density < 1 else 0

    def add_sums(self, total: np.ndarray, kept: np.ndarray, packed: np.ndarray | None, flat0: int) -> None:
        """What the compiled statistics pass (fused.dare_sums, all of a chunk's inputs in one call: the
        caller's TaskArithmetic.observe) made of this input's rows from flat index flat0: the row sums
        of |δ| and of the kept |δ| (float64, (rows,), now this sparsifier's) and, where it remembers
        them, its mask's bits; observe's sums and mask."""
        if packed is not None:
            self._packed[flat0] = packed
        self._total.add_rows(total)
        self._kept.add_rows(kept)

    def observe(self, pass_idx: int, delta: torch.Tensor, flat0: int) -> None:
        """`delta` is the caller's to lose: |δ| is made in its place."""
        keep = self._draw(delta, flat0)
        if self.remember and delta.device.type == "cpu":
            self._packed[flat0] = np.packbits(keep.numpy().reshape(-1))
        mag = delta.abs_()
        self._total.add(row_sums(mag))
        keep_scaled_(mag, keep, 1.0)
        self._kept.add(row_sums(mag))

    def end_pass(self, pass_idx: int) -> None:
        self.factor = l1_factor(self._total.total(), self._kept.total())

    def takes_raw(self, pass_idx: int) -> bool:
        return type(self) is RandomDrop  # dare_sums (RankedDrop says for itself)

    def packed_mask(self, flat0: int) -> np.ndarray | None:
        """The bits the statistics pass kept of the mask of the chunk starting at flat index flat0
        (np.packbits' order), handed over once; None where it kept none."""
        return None if self.keep_all else self._packed.pop(flat0, None)

    def mask(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.keep_all:
            return None
        packed = self.packed_mask(flat0)
        if packed is not None:
            bits = np.unpackbits(packed, count=delta.numel())
            return torch.from_numpy(bits).view(torch.bool).view(delta.shape)
        return self._draw(delta, flat0, base)

    def _draw(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of rows delta (δ, or the input's rows where base is given) from flat index flat0."""
        return bernoulli_mask(self.key, flat0, delta.numel(), self.density, delta.device).view(delta.shape)


class RankedDrop(RandomDrop):
    """DELLA's magprune: keep-probability rises with magnitude rank within each row (axis 1).

    p = (density − ε) + 2ε·(rank − 1)/(n − 1) for ranks 1..n ascending by |δ| in float32
    (ties: lower index ranks lower), drawn from the counter-based generator; L1 rescale over
    the whole tensor. `row_len` is the length of axis 1 (the whole tensor for 0-D and 1-D);
    `whole_rows`: each streamed row is one such row (axis 1 is all of a row: 0-D to 2-D tensors),
    so that the compiled loop ranks the rows of a block as they are, and takes them as read: it
    makes δ from the input and the base itself (takes_raw), in the statistics pass with the L1
    sums. Otherwise (and without numba, or on a GPU) torch ranks δ along axis 1.
    """

    def __init__(self, density: float, epsilon: float, key: int, rescale: bool, row_len: int,
                 whole_rows: bool) -> None:
        super().__init__(density, key, rescale)
        self.epsilon, self.row_len, self.whole_rows = epsilon, row_len, whole_rows
        self.zero_all = density <= 0
        self._probs: np.ndarray | None = None

    def takes_raw(self, pass_idx: int) -> bool:
        return self.whole_rows

    def observe_inputs(self, pass_idx: int, x: torch.Tensor, base: torch.Tensor, flat0: int) -> None:
        """With numba and whole rows, the mask and the row sums of |δ| and the kept |δ| in one
        compiled loop (fused.della_keep), from the input's rows as read: observe's sums and mask."""
        if not self.whole_rows or not fused.usable(x.unsqueeze(0)):
            return Sparsifier.observe_inputs(self, pass_idx, x, base, flat0)
        made = fused.della_keep(x, self.key, flat0, self.row_len, self._prob(), base, sums=True)
        assert made is not None  # usable: the kernels are loaded
        keep, total, kept = made
        if self.remember:
            self._packed[flat0] = np.packbits(keep)
        self._total.add(total)
        self._kept.add(kept)

    def _draw(self, delta: torch.Tensor, flat0: int, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.zero_all:
            return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
        if self.whole_rows and fused.usable(delta.unsqueeze(0)):
            made = fused.della_keep(delta, self.key, flat0, self.row_len, self._prob(), base)
            assert made is not None  # usable: the kernels are loaded
            return torch.from_numpy(made[0]).view(delta.shape)
        if base is not None:  # (fused.task_apply gives a base only where the loops run)
            delta = delta.float() - base.float()
        mag = delta.abs().to(torch.float32).reshape(delta.shape[0], self.row_len, -1)  # rank along axis 1
        order = torch.argsort(mag, dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.row_len, device=delta.device).view(1, -1, 1).expand_as(order))
        prob = (self.density - self.epsilon) + 2 * self.epsilon * rank.double() / (self.row_len - 1)
        u = draws32(self.key, flat0, delta.numel(), delta.device).double() / float(1 << 32)
        return (u < prob.reshape(-1)).view(delta.shape)

    def _prob(self) -> np.ndarray:
        """The keep-probability of each rank 0..row_len − 1, as _draw computes it per element (the same
        torch operations on the ranks themselves, so the same bits), for the compiled loop; all zero
        where density ≤ 0 (_draw's zero mask)."""
        if self._probs is None:
            rank = torch.arange(self.row_len)
            if self.zero_all:
                self._probs = torch.zeros(self.row_len, dtype=torch.float64).numpy()
            else:
                self._probs = ((self.density - self.epsilon)
                               + 2 * self.epsilon * rank.double() / (self.row_len - 1)).numpy()
        return self._probs

"""The task-arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear (SEMANTICS §2.7, §2.8).

For each non-base input: δ = x − base, sparsified (none / exact top-k / DARE / breadcrumbs band), L1-rescaled
if `rescale`, times its weight; then summed, with TIES sign consensus for the *_ties
methods, optionally normalised by the (masked) weight sum, scaled by lambda, added to base.
Passes over the inputs: the sparsifier's statistics passes (top-k and breadcrumbs: 2, 3 with
rescale; DARE and DELLA with rescale: 1), then the apply pass; one read in all when the
tensor fits, and the random masks are then drawn once.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from ..params import ParamSpec
from . import fused
from .base import Cost, MergeOp, MethodDef, TaskContext, majority_sign, no_problems
from .rng import keep_threshold, stream_key
from .sparsify import RandomDrop, Ranked, RankedDrop, Sparsifier, keep_scaled_, magnitude_band, outlier_band

# float32 rows held beyond the inputs, measured per sparsifier in a fresh process
# and rounded up: sums, signs and divisors; int64 draws or bit patterns of one input at a time.
_TEMP_ROWS = {"none": 3.0, "magnitude": 8.0, "magnitude_rescale": 9.0, "outliers": 10.0, "outliers_rescale": 11.0,
              "random": 7.0, "della": 12.0}
# The same where the compiled loops compute every pass (dare_sums, then task_apply drawing the masks
# not kept): the output row, and the kept masks' bits (1/8 byte per element and input) copied into
# the loop's array. Measured on 15 inputs of 2048 x 1024: 1.14 rows with the masks drawn in the loop,
# 1.44 with them kept (the statistics pass: 0.58); 8 before the loop drew them (a bool array per
# input, and their copy into one more).
_LOOP_TEMP_ROWS = {"random": 2.0}


def _band(sparsify: str, ctx: TaskContext, i: int) -> tuple[int, int]:
    """(keep, skip) of input i's magnitude band (TIES, breadcrumbs)."""
    density = float(ctx.input_params[i].get("density", 1.0))
    if sparsify == "magnitude":
        return magnitude_band(density, ctx.numel)
    return outlier_band(density, float(ctx.input_params[i]["gamma"]), ctx.numel)


def _row_len(ctx: TaskContext) -> int:
    """The length of axis 1, along which DELLA ranks (the whole tensor for 0-D and 1-D)."""
    return ctx.shape[1] if len(ctx.shape) >= 2 else max(1, ctx.numel)


def _whole_rows(ctx: TaskContext) -> bool:
    """Whether axis 1, along which DELLA ranks, is all of a streamed row (0-D to 2-D tensors)."""
    return len(ctx.shape) < 2 or ctx.shape[0] * ctx.shape[1] == ctx.numel


def _input_passes(sparsify: str, ctx: TaskContext, i: int) -> int:
    """Statistics passes input i's sparsifier needs."""
    rescale = bool(ctx.shared["rescale"])
    if sparsify in ("magnitude", "outliers"):
        return Ranked.passes(*_band(sparsify, ctx, i), ctx.numel, rescale)
    if sparsify in ("random", "della"):
        return RandomDrop.passes(float(ctx.input_params[i].get("density", 1.0)), rescale)
    return 0


def family_cost(ctx: TaskContext, sparsify: str) -> Cost:
    passes = [_input_passes(sparsify, ctx, i) for i in ctx.others]
    ranked = sparsify in ("magnitude", "outliers")
    temp = _TEMP_ROWS[sparsify + ("_rescale" if bool(ctx.shared["rescale"]) and ranked else "")]
    # a random mask drawn in the statistics pass is kept, bit-packed, for the apply pass
    held = sum(1 for p in passes if p) / 8 if sparsify in ("random", "della") else 0.0
    stat = max(passes, default=0)
    if sparsify in ("random", "none"):  # dare_sums, then task_apply (Sparsifier/RandomDrop.takes_raw)
        raw = stat + 1
    elif ranked:  # the radix passes (not rescale's L1 pass), and the apply pass's masks
        raw = (0 if bool(ctx.shared["rescale"]) else min(2, stat)) + 1
    else:  # DELLA: its loop ranks whole rows as read (della_keep), in every pass; torch ranks the others
        raw = stat + 1 if _whole_rows(ctx) else 0
    # the radix passes' counts and the L1 sums come out the same in any block order; the rescale pass
    # of a ranked mask counts threshold ties in row order (TopK.mask's InOrder)
    any_order = sparsify in ("random", "della") or (ranked and not bool(ctx.shared["rescale"]))
    return Cost(stat, temp, held, raw, _LOOP_TEMP_ROWS.get(sparsify), any_order)


def della_check(ctx: TaskContext) -> list[str]:
    problems = []
    for i in ctx.others:
        density = float(ctx.input_params[i].get("density", 1.0))
        eps = float(ctx.input_params[i]["epsilon"])
        if 0 < density < 1 and not (density - eps > 0 and density + eps < 1):
            problems.append(f"tensor {ctx.tensor!r}: della needs 0 < density - epsilon and density + epsilon < 1 "
                            f"(density {density}, epsilon {eps}); lower epsilon")
        elif 0 < density < 1 and _row_len(ctx) < 2:
            problems.append(f"tensor {ctx.tensor!r}: della ranks along axis 1, which has length {_row_len(ctx)}; "
                            "mergekit fails here too — exclude it with a filter")
    return problems


class _Drawn(NamedTuple):
    """TaskArithmetic._drawn's inputs: their positions j among the other inputs, their sparsifiers,
    their indices in a chunk, their stream keys and their keep thresholds."""

    js: tuple[int, ...]
    sparsifiers: tuple[RandomDrop, ...]
    inputs: list[int]
    keys: tuple[int, ...]
    thresholds: np.ndarray


_NONE_DRAWN = _Drawn((), (), [], (), np.zeros(0, dtype=np.int64))


class TaskArithmetic(MergeOp):
    def __init__(self, ctx: TaskContext, sparsify: str, consensus: bool) -> None:
        self.base = ctx.base
        self.others = ctx.others
        self.consensus = consensus
        self.weights = [float(ctx.input_params[i]["weight"]) for i in self.others]
        self.normalize = bool(ctx.shared["normalize"])
        self.lam = float(ctx.shared["lambda"])
        rescale = bool(ctx.shared["rescale"])
        self.sparsifiers: list[Sparsifier] = []
        for i in self.others:
            density = float(ctx.input_params[i].get("density", 1.0))
            if sparsify in ("magnitude", "outliers"):
                self.sparsifiers.append(Ranked(*_band(sparsify, ctx, i), ctx.numel, rescale))
            elif sparsify == "random":
                key = stream_key(ctx.seed, ctx.input_positions[i], ctx.tensor)
                self.sparsifiers.append(RandomDrop(density, key, rescale))
            elif sparsify == "della":  # della_check has vetted density and epsilon at plan time
                key = stream_key(ctx.seed, ctx.input_positions[i], ctx.tensor)
                eps = float(ctx.input_params[i]["epsilon"])
                self.sparsifiers.append(RankedDrop(density, eps, key, rescale, _row_len(ctx), _whole_rows(ctx)))
            else:
                self.sparsifiers.append(Sparsifier())
        self._drawn_of: dict[int, _Drawn] = {}

    def hold_state(self) -> None:
        for sp in self.sparsifiers:
            if isinstance(sp, RandomDrop) and sp.stat_passes:
                sp.remember = True  # one packed bit per element, counted by family_cost

    def abort(self) -> None:
        for sp in self.sparsifiers:
            sp.abort()

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        flat0 = row0 * x.shape[2]
        drawn = self._drawn(pass_idx) if fused.usable(x) else _NONE_DRAWN
        if drawn.js:  # DARE's inputs: one compiled call for them all
            assert self.base is not None  # the family requires a base
            pack = any(dare.remember for dare in drawn.sparsifiers)
            total, kept, packed = fused.dare_sums(x, self.base, drawn.inputs, drawn.keys, flat0, drawn.thresholds,
                                                  pack)
            for r, dare in enumerate(drawn.sparsifiers):
                dare.add_sums(total[r], kept[r], packed[r] if packed is not None and dare.remember else None, flat0)
        for j, sp in enumerate(self.sparsifiers):
            if pass_idx < sp.stat_passes and j not in drawn.js:
                sp.observe_inputs(pass_idx, x[self.others[j]], x[self.base], flat0)

    def _drawn(self, pass_idx: int) -> _Drawn:
        """The other inputs whose statistics pass `pass_idx` fused.dare_sums makes in one call where
        the loops run: DARE's that rescale (RandomDrop's; not DELLA's ranked draws)."""
        got = self._drawn_of.get(pass_idx)
        if got is None:
            pairs = [(j, sp) for j, sp in enumerate(self.sparsifiers)
                     if type(sp) is RandomDrop and pass_idx < sp.stat_passes]
            got = self._drawn_of[pass_idx] = _Drawn(
                tuple(j for j, _ in pairs), tuple(sp for _, sp in pairs), [self.others[j] for j, _ in pairs],
                tuple(sp.key for _, sp in pairs),
                np.array([keep_threshold(sp.density) for _, sp in pairs], dtype=np.int64))
        return got

    def needs_pass(self, pass_idx: int) -> bool:
        return any(pass_idx < sp.stat_passes and sp.needs_pass(pass_idx) for sp in self.sparsifiers)

    def takes_raw(self, pass_idx: int, x: torch.Tensor) -> bool:
        observing = [sp for sp in self.sparsifiers if pass_idx < sp.stat_passes]  # none: the apply pass
        return fused.usable(x) and all(sp.takes_raw(pass_idx) for sp in observing or self.sparsifiers)

    def end_pass(self, pass_idx: int) -> None:
        for sp in self.sparsifiers:
            if pass_idx < sp.stat_passes:
                sp.end_pass(pass_idx)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if fused.usable(x):
            return self._apply_fused(x, row0)
        flat0 = row0 * x.shape[2]
        base = x[self.base]
        for j, i in enumerate(self.others):
            d = x[i]
            d -= base  # δ in place: x is ours to overwrite
            keep_scaled_(d, *self._mask(j, d, flat0))  # (δ·keep)·factor·w
        deltas = [x[i] for i in self.others]  # views: weighted, sparsified δ (rows, cols)
        total = torch.zeros_like(base)
        for d in deltas:
            total += d
        divisor: torch.Tensor | float
        if not self.consensus:
            divisor = self._weight_divisor()
        else:
            total, divisor = self._consensus(total, deltas)
        if self.normalize:
            total /= divisor
        if self.lam != 1.0:
            total *= self.lam
        return base + total

    def _apply_fused(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        """apply with numba: the masks as before, then the rest in one compiled loop (fused.task_apply),
        the same bits. Where every mask ignores δ (DARE's draws, none) δ is made in that loop too."""
        assert self.base is not None  # the family requires a base
        flat0 = row0 * x.shape[2]
        apply_pass = max((sp.stat_passes for sp in self.sparsifiers), default=0)
        deltas_done = not all(sp.takes_raw(apply_pass) for sp in self.sparsifiers)
        if deltas_done:  # DELLA's torch ranks of δ along axis 1 of a ≥3-D tensor
            for i in self.others:
                x[i] -= x[self.base]
        base = None if deltas_done else x[self.base]  # ranked masks (TIES, DELLA): made from the inputs in the loops
        masks = [self._fused_mask(j, x[i], flat0, base) for j, i in enumerate(self.others)]
        divisor = 1.0 if self.consensus else self._weight_divisor()
        tally = self.tally
        pick = tally.pick if tally is not None and self.others else None
        tallied = np.zeros((3, len(self.others)), dtype=np.int64) if pick is not None else None
        out = fused.task_apply(x, self.base, self.others, [k for k, _ in masks], [s for _, s in masks],
                               self.weights, deltas_done, self.consensus, self.normalize, divisor, self.lam,
                               pick, tallied, start=flat0)
        if tally is not None and tallied is not None and pick is not None:  # counts made in the loop
            if self.consensus:  # _count_agreement's
                tally.add_each(tally.nonzero, self.others, tallied[0].tolist())
                tally.add_each(tally.agree, self.others, tallied[1].tolist())
            looped = [(i, int(n)) for (k, _), i, n in zip(masks, self.others, tallied[2])
                      if isinstance(k, (fused.Draw, np.ndarray))]
            if looped:  # the masks the loop drew or unpacked: the elements seen, and those kept
                inputs = [i for i, _ in looped]
                seen = len(range(*pick.indices(x.shape[1]))) * x.shape[2]
                tally.add_each(tally.seen, inputs, [seen] * len(inputs))
                tally.add_each(tally.kept, inputs, [n for _, n in looped])
        return out

    def _mask(self, j: int, d: torch.Tensor, flat0: int,
              base: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
        """The keep-mask of the j-th other input's rows d (δ, or the input itself where its mask does
        not look at δ, or, given `base`, where a ranked mask makes δ = d − base in its loops) and the
        scale of what it keeps, factor·weight; the tally counts what it kept."""
        sp = self.sparsifiers[j]
        keep = sp.mask(d, flat0, base)
        self._tally_kept(j, d, keep)
        return keep, self._scale(j)

    def _fused_mask(self, j: int, d: torch.Tensor, flat0: int,
                    base: torch.Tensor | None) -> tuple[torch.Tensor | np.ndarray | fused.Draw | None, float]:
        """_mask for fused.task_apply: a mask the statistics pass kept bit-packed comes as those bits,
        which the compiled loop unpacks a tile at a time, instead of np.unpackbits of the whole mask
        and its copy into the loop's array (14-model DARE-TIES at 512 MiB: 50.5 s against 54.5);
        DARE's mask where none was kept as a Draw, drawn in the loop, instead of a bool array per
        input copied into one more; for both the loop makes the report's kept count too. A ranked
        mask is made from the input rows d and base where base is given (δ not made)."""
        sp = self.sparsifiers[j]
        bits = sp.packed_mask(flat0) if isinstance(sp, RandomDrop) else None
        if bits is not None:
            return bits, self._scale(j)
        if type(sp) is RandomDrop and not sp.keep_all:
            return fused.Draw(sp.key, keep_threshold(sp.density)), self._scale(j)
        return self._mask(j, d, flat0, base)

    def _tally_kept(self, j: int, d: torch.Tensor, keep: torch.Tensor | None) -> None:
        """The tally counts the elements of the j-th other input's rows d and those its sparsifier's
        mask `keep` kept (a bool tensor; None: all)."""
        tally, sp = self.tally, self.sparsifiers[j]
        if tally is None or type(sp) is Sparsifier:  # not a sparsifier: nothing to say of δ kept
            return
        tally.count(tally.seen, self.others[j], None, d)
        tally.count(tally.kept, self.others[j], keep, d)

    def _scale(self, j: int) -> float:
        """The scale of what the j-th other input's mask keeps: factor·weight."""
        sp, w = self.sparsifiers[j], self.weights[j]
        return sp.factor * w if sp.factor != 1.0 else w

    def _weight_divisor(self) -> float:
        """normalize's divisor without consensus: the weights' sum, 1 where it is about 0."""
        weight_sum = sum(self.weights)
        return 1.0 if abs(weight_sum) < 1e-8 else weight_sum

    def _count_agreement(self, deltas: list[torch.Tensor], sign: torch.Tensor) -> None:
        """Of the nonzero (kept, weighted) δ in the tally's picked rows, how many agree with sign."""
        tally = self.tally
        pick = tally.pick if tally is not None else None
        if tally is not None and pick is not None and deltas:  # (a merge of the base alone has none)
            rows = torch.stack([d[pick] for d in deltas])
            tally.count_each(tally.nonzero, self.others, rows)
            tally.count_each(tally.agree, self.others, rows.mul_(sign[pick]), positive=True)

    def _consensus(self, total: torch.Tensor, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
        """TIES: the sum of the δ whose sign agrees with the elected one (the majority sign of the
        weighted sum `total`, 0 counting as +; zeros and NaNs never agree), δ·[δ·sign > 0] summed
        over the inputs in order, and with `normalize` the sum of their weights (1 where none agree).

        Where every δ is finite it is summed as max(δ·sign, 0), which rounds as its negation does,
        and turned back by ·sign: the same bits, without a mask. A sub-chunk with an infinite or
        NaN δ (its weighted sum is not finite) takes the masked form, whose ∞·0 gives NaN.
        """
        sign = majority_sign(total)
        if not math.isfinite(float(total.sum())):
            return self._masked(total, deltas, sign)
        total.zero_()
        div = torch.zeros_like(total) if self.normalize else None
        agree = torch.empty_like(total) if self.normalize else None
        for d, w in zip(deltas, self.weights):
            t = d * sign
            t.clamp_min_(0)
            total += t
            if div is not None and agree is not None:
                div.add_(positive(t, agree), alpha=w)
        self._count_agreement(deltas, sign)
        total *= sign
        total.add_(0.0)  # where nothing agrees, +0 as the masked sum gave, not the −0 of +0·−1
        return total, 1.0 if div is None else torch.where(div == 0, 1.0, div)

    def _masked(self, total: torch.Tensor, deltas: list[torch.Tensor],
                sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """_consensus's masked form, δ·[δ·sign > 0]."""
        total.zero_()
        div = torch.zeros_like(total)
        tally = self.tally
        for j, (d, w) in enumerate(zip(deltas, self.weights)):
            agree = (d * sign) > 0
            total += d * agree
            div.add_(agree, alpha=w)
            if tally is not None:
                tally.count(tally.agree, self.others[j], agree, d)
                tally.count(tally.nonzero, self.others[j], d, d)
        return total, torch.where(div == 0, 1.0, div) if self.normalize else 1.0


def positive(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out ← 1 where t > 0, else 0 (NaN: 0), in t's dtype."""
    if t.device.type == "cpu" and t.dtype == torch.float32:  # numpy compares and casts in one pass
        np.greater(t.numpy(), 0, out=out.numpy(), casting="unsafe")
        return out
    return out.copy_(t > 0)


def _family(name: str, sparsify: str, consensus: bool, normalize: bool, rescale: bool,
            pretty: str, url: str) -> MethodDef:
    params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", "float", "nonbase", required=True),
        ParamSpec("density", "float", "nonbase", default=1.0, bounds=(0.0, 1.0)),
        ParamSpec("int8_mask", "bool", "shared", default=False),
        ParamSpec("normalize", "bool", "shared", default=normalize),
        ParamSpec("rescale", "bool", "shared", default=rescale),
        ParamSpec("lambda", "float", "shared", default=1.0),
    )
    if sparsify == "outliers":
        params += (ParamSpec("gamma", "float", "nonbase", default=0.01, bounds=(0.0, 1.0)),)
    if sparsify == "della":
        params += (ParamSpec("epsilon", "float", "nonbase", default=0.15),)
    plain_sum = sparsify == "none" and not consensus  # task_arithmetic: its loops save little, it reads more
    return MethodDef(name=name, params=params, base="required", min_inputs=1, max_inputs=None,
                     make=partial(TaskArithmetic, sparsify=sparsify, consensus=consensus),
                     cost=partial(family_cost, sparsify=sparsify),
                     check=della_check if sparsify == "della" else no_problems,
                     pretty=pretty, url=url, jit=True, io_bound=plain_sum,
                     jit_min_work=fused.SUM_WORK if plain_sum else fused.MIN_WORK)


TASK_ARITHMETIC = _family("task_arithmetic", "none", False, False, False,
                          "Task Arithmetic", "https://arxiv.org/abs/2212.04089")
TIES = _family("ties", "magnitude", True, True, False, "TIES", "https://arxiv.org/abs/2306.01708")
DARE_LINEAR = _family("dare_linear", "random", False, False, True,
                      "Linear DARE", "https://arxiv.org/abs/2311.03099")
DARE_TIES = _family("dare_ties", "random", True, False, True,
                    "DARE TIES", "https://arxiv.org/abs/2311.03099")
DELLA = _family("della", "della", True, True, True, "DELLA", "https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = _family("della_linear", "della", False, False, True, "Linear DELLA", "https://arxiv.org/abs/2406.11617")
BREADCRUMBS = _family("breadcrumbs", "outliers", False, False, False,
                      "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = _family("breadcrumbs_ties", "outliers", True, False, False,
                           "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795")

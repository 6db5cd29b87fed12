"""`sce` (SEMANTICS §2.10): select the elements where the models disagree most, weight each
model by its mean square there, and sum with sign consensus.

Passes over the inputs: with select_topk < 1, two radix passes find the exact top-k of the
per-element variance (k = floor(nonzero count · select_topk), learnt in the first), a third
sums each model's selected squares; with select_topk >= 1 only that third; then the apply
pass — one read in all when the tensor fits.
"""

from __future__ import annotations

import math
import threading

import torch

from ..params import ParamSpec
from .base import Cost, MergeOp, MethodDef, RowSums, TaskContext, majority_sign, row_sums
from .sparsify import TopK, magnitude_bits


def sce_cost(ctx: TaskContext) -> Cost:
    """select_topk <= 0 merges nothing; in (0, 1) two radix passes select, one sums; else one sums."""
    topk = float(ctx.shared["select_topk"])
    return Cost(0 if topk <= 0 else (3 if topk < 1 else 1), 8.0)


class Sce(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        assert ctx.base is not None
        self.base, self.others = ctx.base, ctx.others
        self.topk = float(ctx.shared["select_topk"])
        self.numel = ctx.numel
        self.zero = self.topk <= 0
        self.select = 0 < self.topk < 1
        self.selector = TopK(None)
        self._nonzero = 0
        self._lock = threading.Lock()
        self._squares = [RowSums() for _ in self.others]
        self.weights = [1.0 / len(self.others)] * len(self.others)

    def _taus(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i] - x[self.base] for i in self.others]  # each (rows, cols)

    def _var_bits(self, taus: list[torch.Tensor]) -> torch.Tensor:
        """Population variance across models, element-wise (torch.var over the model axis is ~10x
        slower), as magnitude_bits: a NaN variance (an infinite or NaN delta) ranks as QUIET_NAN,
        above every number, as torch.topk ranks NaN. (Its own bits, x86's default NaN with the sign
        set, were a negative int32 the histogram refused: a traceback.)"""
        mean = sum(taus[1:], taus[0].clone()) / len(taus)
        var = sum(((t - mean) ** 2 for t in taus[1:]), (taus[0] - mean) ** 2) / len(taus)
        return magnitude_bits(var)

    def _selected(self, taus: list[torch.Tensor], flat0: int) -> list[torch.Tensor]:
        if not self.select:
            return taus
        keep = self.selector.mask(self._var_bits(taus), flat0)
        return [t * keep for t in taus]

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        taus = self._taus(x)
        if self.select and pass_idx < 2:
            bits = self._var_bits(taus)
            if pass_idx == 0:
                nonzero = int((bits != 0).sum())
                with self._lock:
                    self._nonzero += nonzero
            self.selector.observe(pass_idx, bits)
            return
        for acc, t in zip(self._squares, self._selected(taus, row0 * x.shape[2])):
            acc.add(row_sums(t * t))

    def abort(self) -> None:
        self.selector.order.abort()

    def end_pass(self, pass_idx: int) -> None:
        if self.select and pass_idx < 2:
            if pass_idx == 0:
                self.selector.k = math.floor(self._nonzero * self.topk)
            self.selector.end_pass(pass_idx)
            if pass_idx == 1:
                self.selector.restart()
            return
        s = [acc.total() / max(1, self.numel) for acc in self._squares]
        total = sum(s)
        self.weights = [1.0 / len(s)] * len(s) if abs(total) < 1e-6 else [v / total for v in s]
        self.selector.restart()  # the apply pass selects again from the first chunk

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        base = x[self.base]
        if self.zero:
            return base.clone()
        taus = self._selected(self._taus(x), row0 * x.shape[2])
        sign = majority_sign(sum(taus[1:], taus[0].clone()))
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for w, t in zip(self.weights, taus):
            agree = (torch.sign(t) == sign).to(x.dtype) * w
            num += agree * t
            den += agree
        return base + num / den.clamp_min(1e-6)


SCE = MethodDef(
    name="sce",
    params=(ParamSpec("int8_mask", "bool", "shared", default=False),
            ParamSpec("select_topk", "float", "shared", default=1.0, bounds=(0.0, 1.0))),
    base="required", min_inputs=1, max_inputs=None, make=Sce, cost=sce_cost, min_others=1,
    pretty="SCE", url="https://arxiv.org/abs/2408.07990",
)

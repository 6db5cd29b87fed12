"""`linear`: a weighted average of all inputs (SEMANTICS §2.2). One pass, no statistics; on a CPU
with numba, large merges run it as one compiled loop (fused.linear_sum), with the same bits."""

from __future__ import annotations

import numpy as np
import torch

from ..params import ParamSpec
from . import fused
from .base import Cost, MergeOp, MethodDef, TaskContext

LINEAR_COST = Cost(0, 2.5, raw_passes=1, loop_temp_rows=1.0)


class Linear(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        self.weights = [float(p["weight"]) for p in ctx.input_params]
        self.normalize = bool(ctx.shared["normalize"])
        self._total = torch.tensor(self.weights, dtype=torch.float64).sum()
        self._w32 = np.array(self.weights, dtype=np.float32)  # as torch rounds alpha for a float32 add_
        self._divisors: dict[torch.dtype, torch.Tensor | None] = {}

    def divisor(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight sum in the work dtype, or None where there is nothing to divide by: no
        `normalize`, or a sum of exactly 1 (x / 1 is x for every float the sums give, -0, the
        infinities, subnormals and their quiet NaNs included: skipping it writes the same bits, and
        saves a pass over every sub-chunk: with the divisor made once, apply's CPU in a 3-model
        merge fell from 0.30-0.38 s to 0.18-0.27)."""
        if dtype not in self._divisors:
            d = self._total.to(dtype)
            self._divisors[dtype] = d if self.normalize and float(d) != 1.0 else None
        return self._divisors[dtype]

    def takes_raw(self, pass_idx: int, x: torch.Tensor) -> bool:
        return fused.usable(x)  # the loop widens each element as it loads it

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if fused.usable(x):  # one loop from the rows as read to the sum, cast as written: the same bits
            d = self.divisor(torch.float32)
            got = fused.linear_sum(x, self._w32, None if d is None else float(d),
                                   self.out if self.out in fused.LOADED else torch.float32)
            assert got is not None  # usable: the kernels are loaded
            return got
        acc = torch.zeros_like(x[0])  # (rows, cols)
        for w, xi in zip(self.weights, x):
            acc.add_(xi, alpha=w)
        d = self.divisor(acc.dtype)
        if d is not None:
            # IEEE division: a zero weight sum gives NaN/inf, as mergekit does (§2.15).
            acc /= d
        return acc


LINEAR = MethodDef(
    name="linear",
    params=(ParamSpec("weight", "float", "input", required=True),
            ParamSpec("normalize", "bool", "shared", default=True)),
    base="ignored", min_inputs=1, max_inputs=None, make=Linear,
    # torch's forms: the accumulator and the cast output (measured 1.6); the loop: the float32 rows it
    # gives where the output is float16 (its bfloat16 and float32 rows are the output itself)
    cost=lambda ctx: LINEAR_COST,
    jit=True, jit_loops="linear", jit_mismatch=fused.add_unfused, jit_min_work=fused.SUM_WORK, io_bound=True,
    pretty="Linear", url="https://arxiv.org/abs/2203.05482",
)

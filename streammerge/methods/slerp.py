"""`slerp`: spherical interpolation of the base and one other model, whole tensor as one vector.

SEMANTICS §2.3. One statistics pass (‖v0‖², ‖v1‖², v0·v1 as chunk-independent float64 sums:
row_sums' per-row tree sums, all three in one compiled loop where numba is loaded), then the apply
pass: out = c0·v0 + c1·v1 with scalar coefficients (one compiled loop too, from the rows as read
to the output's dtype).
"""

from __future__ import annotations

import math

import torch

from ..params import ParamSpec
from . import fused
from .base import Cost, MergeOp, MethodDef, RowSums, TaskContext, row_sums

EPS = 1e-8
# temporaries: products, scaled inputs, the output (measured 3.1); the loops take blocks as read in
# both passes (the sums', and the apply pass's weighted_pair)
SLERP_COST = Cost(1, 4.0, raw_passes=2, any_order=True)
DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, nn0: float, nn1: float, dot: float) -> tuple[float, float]:
    """(c0, c1) with out = c0·v0 + c1·v1, from squared norms and the dot product."""
    n0 = math.sqrt(nn0)
    n1 = math.sqrt(nn1)
    n0 = 1.0 if n0 <= EPS else n0
    n1 = 1.0 if n1 <= EPS else n1
    d = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(d)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


class Slerp(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        assert ctx.base is not None  # the plan enforces the contract
        self.i0, self.i1 = ctx.base, ctx.others[0]
        self.t = float(ctx.shared["t"])
        self._sums = (RowSums(), RowSums(), RowSums())
        self.c0, self.c1 = 1.0 - self.t, self.t

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        v0, v1 = x[self.i0], x[self.i1]
        if fused.usable(x):  # the three products' row sums in one loop, no temporaries: the same bits
            for acc, sums in zip(self._sums, fused.slerp_sums(v0, v1)):
                acc.add(sums)
            return
        self._sums[0].add(row_sums(v0 * v0))
        self._sums[1].add(row_sums(v1 * v1))
        self._sums[2].add(row_sums(v0 * v1))

    def takes_raw(self, pass_idx: int, x: torch.Tensor) -> bool:
        return fused.usable(x)  # the sums' loop, and the apply pass's

    def end_pass(self, pass_idx: int) -> None:
        nn0, nn1, dot = (s.total() for s in self._sums)
        self.c0, self.c1 = slerp_coefficients(self.t, nn0, nn1, dot)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if fused.usable(x):  # one loop from the rows as read to the sum, cast as written: the same bits
            got = fused.weighted_pair(x[self.i0], x[self.i1], self.c0, self.c1,
                                      self.out if self.out in fused.LOADED else torch.float32)
            assert got is not None  # usable: the kernels are loaded
            return got
        # the other input scaled in place (the apply pass's x is ours to overwrite): one temporary fewer
        return (x[self.i0] * self.c0).add_(x[self.i1].mul_(self.c1))


SLERP = MethodDef(
    name="slerp",
    params=(ParamSpec("t", "float", "shared", required=True, bounds=(0.0, 1.0)),),
    base="required", min_inputs=2, max_inputs=2, make=Slerp,
    cost=lambda ctx: SLERP_COST,
    min_others=1, jit=True, jit_loops="slerp", jit_min_work=fused.SLIM_WORK, io_bound=True,
    pretty="SLERP", url="https://en.wikipedia.org/wiki/Slerp",
)

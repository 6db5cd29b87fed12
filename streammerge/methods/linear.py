"""`linear`: a weighted average of all inputs (SEMANTICS §2.2). One pass, no statistics."""

from __future__ import annotations

import torch

from ..params import ParamSpec
from .base import MergeOp, MethodDef, TaskContext, fixed_cost


class Linear(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        self.weights = [float(p["weight"]) for p in ctx.input_params]
        self.normalize = bool(ctx.shared["normalize"])

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        acc = torch.zeros_like(x[0])  # (rows, cols)
        for w, xi in zip(self.weights, x):
            acc.add_(xi, alpha=w)
        if self.normalize:
            # IEEE division: a zero weight sum gives NaN/inf, as mergekit does (§2.15).
            acc /= torch.tensor(self.weights, dtype=torch.float64).sum().to(acc.dtype)
        return acc


LINEAR = MethodDef(
    name="linear",
    params=(ParamSpec("weight", "float", "input", required=True),
            ParamSpec("normalize", "bool", "shared", default=True)),
    base="ignored", min_inputs=1, max_inputs=None, make=Linear,
    cost=fixed_cost(0, 2.5),  # the accumulator and the cast output (measured 1.6)
    io_bound=True,
    pretty="Linear", url="https://arxiv.org/abs/2203.05482",
)

"""`model_stock` (SEMANTICS §2.9): the base moved toward the mean of the others by a ratio set
by the average cosine between their offsets from the base.

Whole tensor (default): one statistics pass sums every pair's dot product and each offset's
squared norm (chunk-independent float64 row sums), then the apply pass. `filter_wise`: one
ratio per row, all within a chunk, so a single pass.
"""

from __future__ import annotations

import itertools

import torch

from ..params import ParamSpec
from .base import Cost, MergeOp, MethodDef, RowSums, TaskContext, row_sums


def stock_ratio(k: int, cos_mean: torch.Tensor | float) -> torch.Tensor:
    """t = k·c / (1 + (k−1)·c), and 0 where |1 + (k−1)·c| < 1e-6."""
    c = torch.as_tensor(cos_mean, dtype=torch.float64)
    den = 1 + (k - 1) * c
    return torch.where(den.abs() < 1e-6, torch.zeros_like(c), k * c / torch.where(den.abs() < 1e-6, 1.0, den))


class ModelStock(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        assert ctx.base is not None
        self.base, self.others = ctx.base, ctx.others
        self.filter_wise = bool(ctx.shared["filter_wise"])
        self.last = ctx.shape[-1] if len(ctx.shape) >= 2 else max(1, ctx.numel)  # filter_wise vector length
        self.pairs = list(itertools.combinations(range(len(self.others)), 2))
        self._dots = {p: RowSums() for p in itertools.combinations_with_replacement(range(len(self.others)), 2)}
        self.t: torch.Tensor | None = None

    def _offsets(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i] - x[self.base] for i in self.others]

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        off = self._offsets(x)
        for (i, j), acc in self._dots.items():
            acc.add(row_sums(off[i] * off[j]))

    def end_pass(self, pass_idx: int) -> None:
        dots = {p: torch.tensor(acc.total(), dtype=torch.float64) for p, acc in self._dots.items()}
        self.t = stock_ratio(len(self.others), self._mean_cos(lambda i, j: dots[(i, j)]))

    def _mean_cos(self, dot) -> torch.Tensor:  # type: ignore[no-untyped-def]
        cos = []
        for i, j in self.pairs:
            norm = (dot(i, i).sqrt() * dot(j, j).sqrt()).clamp_min(1e-6)
            cos.append((dot(i, j) / norm).clamp(-1, 1))
        return torch.stack(cos).mean(0)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if self.filter_wise:
            # one ratio per vector along the last axis (a row of a 2-D weight; 1-D is one vector)
            off = [o.double().reshape(-1, self.last) for o in self._offsets(x)]
            t = stock_ratio(len(self.others), self._mean_cos(lambda i, j: (off[i] * off[j]).sum(1)))
            t = t.to(x.dtype).unsqueeze(1).expand(-1, self.last).reshape(x.shape[1:])
        else:
            assert self.t is not None
            t = self.t.to(x.device, x.dtype)
        mean = x[self.others[0]].clone()
        for i in self.others[1:]:
            mean += x[i]
        mean /= len(self.others)
        return t * mean + (1 - t) * x[self.base]


MODEL_STOCK = MethodDef(
    name="model_stock", params=(ParamSpec("filter_wise", "bool", "shared", default=False),),
    base="required", min_inputs=3, max_inputs=None, make=ModelStock, min_others=2,
    cost=lambda ctx: Cost(0 if ctx.shared["filter_wise"] else 1, 4.0, any_order=True),
    pretty="Model Stock", url="https://arxiv.org/abs/2403.19522",
)

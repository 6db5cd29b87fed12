"""`arcee_fusion` (SEMANTICS §2.12): take the other model's change where it matters most.

Importance I = |b − a| · KL(softmax(b) ‖ softmax(a)) per vector along the last axis; the
threshold is median + 1.5·IQR of I over the whole tensor — of every element up to a million,
else of a million positions drawn with replacement from the counter-based generator. One
statistics pass collects those values; the apply pass keeps b's change where I >= threshold.
"""

from __future__ import annotations

import math

import torch

from .base import MergeOp, MethodDef, TaskContext, fixed_cost
from .rng import draws53, stream_key

SAMPLE = 1_000_000
SAMPLE_STREAM = -1  # the input position the sample's draws are keyed by: no input has it


def sample_positions(seed: int, tensor: str, numel: int) -> torch.Tensor:
    """The flat positions whose importance sets the threshold, sorted (with repeats)."""
    if numel <= SAMPLE:
        return torch.arange(numel, dtype=torch.int64)
    return torch.sort(draws53(stream_key(seed, SAMPLE_STREAM, tensor), 0, SAMPLE) % numel).values


def quantile(sorted_values: torch.Tensor, q: float) -> float:
    """mergekit's quantile: the element at floor(q·(n−1)) of the sorted values, no interpolation."""
    return float(sorted_values[math.floor(q * (sorted_values.numel() - 1))])


class ArceeFusion(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        assert ctx.base is not None
        self.a, self.b = ctx.base, ctx.others[0]
        self.last = ctx.shape[-1] if ctx.shape else 1
        self.scalar = len(ctx.shape) == 0
        self.ctx = ctx
        self.positions: torch.Tensor | None = None  # drawn on the first statistics pass
        self._values: list[torch.Tensor] = []
        self.threshold = 0.0

    def importance(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[self.a], x[self.b]
        if self.scalar:
            return torch.zeros_like(a)  # a 0-D tensor has KL = 0
        av, bv = a.reshape(-1, self.last), b.reshape(-1, self.last)
        p = torch.softmax(bv, dim=-1) + 1e-8
        q = torch.softmax(av, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        return ((bv - av).abs() * kl).reshape(a.shape)

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        if self.positions is None:
            self.positions = sample_positions(self.ctx.seed, self.ctx.tensor, self.ctx.numel)
        flat0, count = row0 * x.shape[2], x.shape[1] * x.shape[2]
        lo, hi = torch.searchsorted(self.positions, torch.tensor([flat0, flat0 + count])).tolist()
        if hi > lo:
            self._values.append(self.importance(x).reshape(-1)[self.positions[lo:hi] - flat0].double())

    def end_pass(self, pass_idx: int) -> None:
        values = torch.sort(torch.cat(self._values)).values if self._values else torch.zeros(1, dtype=torch.float64)
        self._values = []
        self.threshold = quantile(values, 0.5) + 1.5 * (quantile(values, 0.75) - quantile(values, 0.25))

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        a, b = x[self.a], x[self.b]
        keep = self.importance(x).double() >= self.threshold
        return a + (b - a) * keep


ARCEE_FUSION = MethodDef(
    name="arcee_fusion", params=(), base="required", min_inputs=2, max_inputs=2, make=ArceeFusion,
    cost=fixed_cost(1, 6.0),
    min_others=1, max_others=1, pretty="Arcee Fusion", url="https://arcee.ai",
)

"""`arcee_fusion` (SEMANTICS §2.12): take the other model's change where it matters most.

Importance I = |b − a| · KL(softmax(b) ‖ softmax(a)) per vector along the last axis; the
threshold is median + 1.5·IQR of I over the whole tensor — of every element up to a million,
else of a million positions drawn with replacement from the counter-based generator. One
statistics pass collects those values; the apply pass keeps b's change where I >= threshold.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .base import Cost, MergeOp, MethodDef, TaskContext
from .rng import draws53, stream_key

SAMPLE = 1_000_000
SAMPLE_STREAM = -1  # the input position the sample's draws are keyed by: no input has it


def sample_positions(seed: int, tensor: str, numel: int) -> torch.Tensor:
    """The flat positions whose importance sets the threshold, sorted (with repeats). Sorted by numpy,
    as uint32 where they fit (every tensor below 2^32 elements): 6.5 ms for the million against
    torch's int64 sort's 30 here, paid by every tensor above a million elements."""
    if numel <= SAMPLE:
        return torch.arange(numel, dtype=torch.int64)
    drawn = (draws53(stream_key(seed, SAMPLE_STREAM, tensor), 0, SAMPLE) % numel).numpy()
    if numel <= 1 << 32:
        drawn = drawn.astype(np.uint32)
    return torch.from_numpy(np.sort(drawn).astype(np.int64))


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """mergekit's quantiles of `values` in any order: for each q the element at floor(q·(n−1)) of the
    values sorted (NaN last), found by selection (np.partition at those places, O(n)) — the same
    values a sort puts there, where sorting the million of a large tensor took 110 ms against 18.
    +0 for a zero of either sign (unsorted, ±0 are equal, and compare so with importances too)."""
    v = values.detach().cpu().double().numpy()
    at = [math.floor(q * (v.size - 1)) for q in qs]
    picked = np.partition(v, sorted(set(at)))
    return [float(picked[i]) + 0.0 for i in at]


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
        # hold_state: each vector's KL, kept from the statistics pass for the apply pass (its
        # softmaxes and log were half of a 2-model fusion's arithmetic); float, one per vector
        self._kl: torch.Tensor | None = None
        self._held = False
        self._lock = threading.Lock()

    def hold_state(self) -> None:
        self._held = True

    def importance(self, x: torch.Tensor, row0: int = 0, use_held: bool = False) -> torch.Tensor:
        """I = |b − a|·KL of the chunk x whose first row is row0: KL computed (and kept, when held),
        or with `use_held` the statistics pass's."""
        a, b = x[self.a], x[self.b]
        if self.scalar:
            return torch.zeros_like(a)  # a 0-D tensor has KL = 0
        av, bv = a.reshape(-1, self.last), b.reshape(-1, self.last)
        v0 = row0 * x.shape[2] // self.last  # (a row holds whole vectors: the last axis)
        if use_held and self._kl is not None:
            kl = self._kl[v0:v0 + av.shape[0]]
        else:
            p = torch.softmax(bv, dim=-1) + 1e-8
            q = torch.softmax(av, dim=-1) + 1e-8
            kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
            if self._held:
                self._keep_kl(v0, kl)
        return ((bv - av).abs() * kl).reshape(a.shape)

    def _keep_kl(self, v0: int, kl: torch.Tensor) -> None:
        if self._kl is None:
            with self._lock:
                if self._kl is None:
                    self._kl = torch.empty(self.ctx.numel // self.last, 1, dtype=kl.dtype, device=kl.device)
        self._kl[v0:v0 + kl.shape[0]] = kl  # threads keep disjoint vectors

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        if self.positions is None:
            self.positions = sample_positions(self.ctx.seed, self.ctx.tensor, self.ctx.numel)
        flat0, count = row0 * x.shape[2], x.shape[1] * x.shape[2]
        lo, hi = torch.searchsorted(self.positions, torch.tensor([flat0, flat0 + count])).tolist()
        if hi > lo or self._held:  # (held: every vector's KL, sampled or not)
            importance = self.importance(x, row0)
            if hi > lo:
                self._values.append(importance.reshape(-1)[self.positions[lo:hi] - flat0].double())

    def end_pass(self, pass_idx: int) -> None:
        values = torch.cat(self._values) if self._values else torch.zeros(1, dtype=torch.float64)
        self._values = []
        q25, q50, q75 = quantiles(values, (0.25, 0.5, 0.75))
        self.threshold = q50 + 1.5 * (q75 - q25)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        a, b = x[self.a], x[self.b]
        keep = self.importance(x, row0, use_held=True).double() >= self.threshold
        return a + (b - a) * keep


def fusion_cost(ctx: TaskContext) -> Cost:
    """One statistics pass; each vector's KL (at most 8 bytes: float64 compute) held for the apply pass."""
    return Cost(1, 6.0, held_per_element=8.0 / (ctx.shape[-1] if ctx.shape else 1), any_order=True)


ARCEE_FUSION = MethodDef(
    name="arcee_fusion", params=(), base="required", min_inputs=2, max_inputs=2, make=ArceeFusion,
    cost=fusion_cost,
    min_others=1, max_others=1, pretty="Arcee Fusion", url="https://arcee.ai",
)

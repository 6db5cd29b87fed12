"""Methods that need no whole-tensor statistics, or only integer counts: passthrough, nearswap,
ram, ramplus_tl (SEMANTICS §2.11, §2.13, §2.14).

passthrough, nearswap and ram make one pass over their inputs; ramplus_tl makes one
statistics pass (how many of each input's active elements are shared or unique, exact
integer counts) and the apply pass — one read in all when the tensor fits.
"""

from __future__ import annotations

import threading

import torch

from ..params import ParamSpec
from .base import MergeOp, MethodDef, TaskContext, fixed_cost


class Passthrough(MergeOp):
    def __init__(self, ctx: TaskContext) -> None:
        scale = ctx.input_params[0].get("scale")
        self.scale = None if scale is None else float(scale)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        return x[0] if self.scale is None else x[0] * self.scale


class Nearswap(MergeOp):
    """w = clamp(t / max(|a−b|, 1e-6), 0, 1); out = w·b + (1−w)·a, a the base."""

    def __init__(self, ctx: TaskContext) -> None:
        assert ctx.base is not None
        self.a, self.b = ctx.base, ctx.others[0]
        self.t = float(ctx.shared["t"])

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        a, b = x[self.a], x[self.b]
        w = (self.t / (a - b).abs().clamp_min(1e-6)).clamp(0, 1)
        return w * b + (1 - w) * a


class Ram(MergeOp):
    """Unique contributions added as they are, shared ones averaged over the inputs active there."""

    def __init__(self, ctx: TaskContext, plus: bool) -> None:
        assert ctx.base is not None
        self.base, self.others = ctx.base, ctx.others
        self.eps = float(ctx.shared["epsilon"])
        self.plus = plus
        self.r = float(ctx.shared.get("r", 0.0))
        self.alpha = float(ctx.shared.get("alpha", 0.0))
        self._shared = [0] * len(self.others)
        self._unique = [0] * len(self.others)
        self._lock = threading.Lock()
        self.lam = [1.0] * len(self.others)

    def _active(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        taus = [x[i] - x[self.base] for i in self.others]
        active = [t.abs() > self.eps for t in taus]
        count = torch.zeros_like(taus[0], dtype=torch.int32)
        for a in active:
            count += a
        return taus, active, count

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        _, active, count = self._active(x)
        for i, a in enumerate(active):
            shared, unique = int((a & (count > 1)).sum()), int((a & (count == 1)).sum())
            with self._lock:
                self._shared[i] += shared
                self._unique[i] += unique

    def end_pass(self, pass_idx: int) -> None:
        # float32 scalars, as mergekit computes ρ and λ (λ = 1.02 shows as 1.0199999809)
        for i in range(len(self.others)):
            rho = torch.tensor(self._shared[i], dtype=torch.float32) / max(float(self._unique[i]), self.eps)
            lam = 1 + self.r * rho.clamp(0, self.alpha)
            self.lam[i] = float(lam.to(torch.float32))

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        taus, active, count = self._active(x)
        unique = (count == 1).to(x.dtype)
        shared = (count > 1).to(x.dtype) / count.clamp_min(1).to(x.dtype)
        out = x[self.base].clone()
        for tau, a, lam in zip(taus, active, self.lam):
            out += tau * a * ((lam * unique if self.plus else unique) + shared)
        return out


PASSTHROUGH = MethodDef(
    name="passthrough", params=(ParamSpec("scale", "float", "input", default=None, nullable=True),),
    base="ignored", min_inputs=1, max_inputs=1, make=Passthrough, cost=fixed_cost(0, 1.0), io_bound=True,
    pretty="Passthrough", url="",
)
NEARSWAP = MethodDef(
    name="nearswap", params=(ParamSpec("t", "float", "shared", required=True),),
    base="required", min_inputs=2, max_inputs=2, make=Nearswap, cost=fixed_cost(0, 3.0), min_others=1,
    pretty="NearSwap", url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
RAM = MethodDef(
    name="ram", params=(ParamSpec("epsilon", "float", "shared", default=1e-5),),
    base="required", min_inputs=1, max_inputs=None, make=lambda ctx: Ram(ctx, plus=False), cost=fixed_cost(0, 5.0),
    pretty="RAM", url="https://arxiv.org/abs/2510.23048",
)
RAMPLUS_TL = MethodDef(
    name="ramplus_tl",
    params=(ParamSpec("r", "float", "shared", default=0.1), ParamSpec("alpha", "float", "shared", default=0.2),
            ParamSpec("epsilon", "float", "shared", default=1e-5)),
    base="required", min_inputs=1, max_inputs=None, make=lambda ctx: Ram(ctx, plus=True),
    cost=fixed_cost(1, 5.0, any_order=True),
    pretty="RAM+ (TL)", url="https://arxiv.org/abs/2510.23048",
)

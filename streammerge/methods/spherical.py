"""Spherical methods: multislerp, karcher, nuslerp (SEMANTICS §2.4–2.6).

Every vector these methods form is a linear combination of their inputs, so one statistics
pass accumulating the inputs' Gram matrix (pairwise dot products, chunk-independent float64
row sums) gives every norm and angle; the iterations (karcher's Karcher mean) then run on
the coefficients in float64, and the apply pass forms Σ c_i x_i. Passes over the inputs:
one statistics pass and the apply pass (one read in all when the tensor fits); nuslerp
along rows needs no statistics pass, along columns it sums per column in fixed row order.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..errors import PlanError
from ..params import ParamSpec
from .base import Cost, MergeOp, MethodDef, RowSums, TaskContext, row_sums


class GramOp(MergeOp):
    """Accumulates the Gram matrix of some vectors formed from x (float64, chunk-independent)."""

    def vectors(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def start_gram(self, n: int) -> None:
        self._sums = {p: RowSums() for p in itertools.combinations_with_replacement(range(n), 2)}
        self.n = n

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        v = self.vectors(x)
        for (i, j), acc in self._sums.items():
            acc.add(row_sums(v[i] * v[j]))

    def gram(self) -> torch.Tensor:
        g = torch.zeros(self.n, self.n, dtype=torch.float64)
        for (i, j), acc in self._sums.items():
            g[i, j] = g[j, i] = acc.total()
        return g


def _norm(c: torch.Tensor, g: torch.Tensor) -> float:
    """‖Σ c_i v_i‖ from coefficients and the Gram matrix; NaN where an input's infinities or NaN
    made the Gram matrix NaN (max(0.0, nan) is 0.0: multislerp then called the weighted sum zero
    and refused the tensor, where mergekit's arithmetic, as ours now, gives a NaN tensor that is
    reported)."""
    q = float(c @ g @ c)
    return q if math.isnan(q) else math.sqrt(max(0.0, q))


class MultiSlerp(GramOp):
    """Weighted spherical mean of the (base-relative) inputs on the unit sphere, rescaled."""

    def __init__(self, ctx: TaskContext) -> None:
        self.base, self.others, self.tensor = ctx.base, ctx.others, ctx.tensor
        self.w = torch.tensor([float(ctx.input_params[i]["weight"]) for i in self.others], dtype=torch.float64)
        self.normalize = bool(ctx.shared["normalize_weights"])
        self.eps = float(ctx.shared["eps"])
        self.single = len(self.others) == 1
        self.start_gram(len(self.others))
        self.coef = torch.zeros(len(self.others), dtype=torch.float64)

    def vectors(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i] - x[self.base] if self.base is not None else x[i] for i in self.others]

    def end_pass(self, pass_idx: int) -> None:
        g, eps = self.gram(), self.eps
        w = self.w / self.w.sum() if self.normalize else self.w  # no guard for a zero sum, as mergekit
        r = g.diagonal().clamp_min(0).sqrt()
        a = w / (r + eps)  # m = Σ w_i u_i, u_i = v_i / (r_i + eps)
        m_norm = _norm(a, g)
        if m_norm < eps:
            if len(self.others) != 2:
                raise PlanError(f"tensor {self.tensor!r}: multislerp: the weighted sum of the input tensors is "
                                f"zero (their directions' sum has norm {m_norm:.3g}, under eps {eps:g}); change "
                                "the weights, or lower eps")
            self.coef = w.clone()
            return
        m_hat = a / m_norm
        u_dot_m = (g @ m_hat) / (r + eps)  # u_i · m̂
        g_coef = a - (w * u_dot_m).sum() * m_hat  # Σ w_i (u_i − (u_i·m̂) m̂)
        s = _norm(g_coef, g) + eps
        # sin(s)/s at s = 0 is its limit, 1 (as every s under 1e-8 rounds it): the tangent sum is 0
        # but for rounding (Σ w_i u_i − ‖m‖ m̂), so with `eps: 0` s is often exactly 0, where
        # mergekit's 0/0 made the tensor NaN and Python's a ZeroDivisionError (README: differences)
        p = m_hat * math.cos(s) + g_coef * (math.sin(s) / s if s else 1.0)
        self.coef = p * float((w * r).sum())

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if self.single:
            return x[self.others[0]].clone()
        v = self.vectors(x)
        out = v[0] * float(self.coef[0])
        for c, vi in zip(self.coef[1:].tolist(), v[1:]):
            out += vi * c
        if self.base is not None:
            out += x[self.base]
        return out


class Karcher(GramOp):
    """The Karcher (Riemannian) mean of the inputs' directions, times their mean norm."""

    def __init__(self, ctx: TaskContext) -> None:
        self.n_in = ctx.n_inputs
        self.max_iter = int(ctx.shared["max_iter"])
        self.tol = float(ctx.shared["tol"])
        self.start_gram(self.n_in)
        self.coef = torch.zeros(self.n_in, dtype=torch.float64)

    def vectors(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x)

    def end_pass(self, pass_idx: int) -> None:
        g, tol, n = self.gram(), self.tol, self.n_in
        r = g.diagonal().clamp_min(0).sqrt()
        unit = [torch.eye(n, dtype=torch.float64)[i] / r[i] if r[i] > 0 else torch.zeros(n, dtype=torch.float64)
                for i in range(n)]  # u_i as coefficients
        valid = [i for i in range(n) if r[i] > tol]
        if not valid:
            self.coef = torch.zeros(n, dtype=torch.float64)
            return
        beta = 1.0 / len(valid)
        m = sum((beta * unit[i] for i in valid), torch.zeros(n, dtype=torch.float64))
        m = unit[valid[0]] if _norm(m, g) < tol else m / _norm(m, g)
        for _ in range(self.max_iter):
            t = torch.zeros(n, dtype=torch.float64)
            for i in valid:
                c = max(-1.0, min(1.0, float(m @ g @ unit[i])))
                theta = math.acos(c)
                if theta < tol:
                    continue
                t += beta * (theta / math.sin(theta)) * (unit[i] - c * m)
            t_norm = _norm(t, g)
            if t_norm < tol:
                break
            m = math.cos(t_norm) * m + math.sin(t_norm) * t / t_norm
            if _norm(m, g) > tol:
                m = m / _norm(m, g)
        self.coef = m * float(r.sum() / n)  # (Σ α_i r_i) m over all inputs

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        if self.n_in == 1:
            return x[0].clone()
        out = x[0] * float(self.coef[0])
        for c, xi in zip(self.coef[1:].tolist(), x[1:]):
            out += xi * c
        return out


def _nuslerp_coefficients(t: float, xx: torch.Tensor, yy: torch.Tensor,
                          xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), elementwise over vectors, with out = c0·x + c1·y (SEMANTICS §2.4)."""
    nx, ny = xx.clamp_min(0).sqrt().clamp_min(1e-7), yy.clamp_min(0).sqrt().clamp_min(1e-7)
    c = (xy / (nx * ny)).clamp(-1, 1)
    colinear = 1 - c * c <= 1e-16
    theta = torch.acos(c)
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(c, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(c, t), torch.sin(t * theta) / s)
    return c0, c1


def nuslerp_layout(ctx: TaskContext) -> str:
    """How nuslerp takes its vectors: "flat" (the whole tensor), "columns" or "rows"."""
    if bool(ctx.shared["nuslerp_flatten"]) or len(ctx.shape) <= 1:
        return "flat"  # a 1-D tensor is one vector along either axis
    return "columns" if bool(ctx.shared["nuslerp_row_wise"]) else "rows"


def nuslerp_check(ctx: TaskContext) -> list[str]:
    if len(ctx.shape) > 2 and nuslerp_layout(ctx) != "flat":
        return [f"tensor {ctx.tensor!r}: nuslerp with nuslerp_flatten: false on a {len(ctx.shape)}-D tensor is not "
                "supported yet; use nuslerp_flatten: true"]
    return []


class NuSlerp(MergeOp):
    """Slerp of two (base-relative) inputs by their weights: whole tensor, per row, or per column."""

    def __init__(self, ctx: TaskContext) -> None:
        self.base = ctx.base
        self.a, self.b = ctx.others
        wa, wb = (float(ctx.input_params[i]["weight"]) for i in ctx.others)
        self.t = 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
        self.layout = nuslerp_layout(ctx)
        # per-column sums are added row after row: sub-chunks must come in row order
        self.parallel = self.layout != "columns"
        self.last = ctx.shape[-1] if ctx.shape else 1
        self._flat = (RowSums(), RowSums(), RowSums())
        cols = ctx.numel // (ctx.shape[0] if len(ctx.shape) >= 2 else 1) if ctx.shape else 1
        self._cols = torch.zeros(3, cols, dtype=torch.float64)
        self.c0: torch.Tensor = torch.tensor(1 - self.t)
        self.c1: torch.Tensor = torch.tensor(self.t)

    def _xy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base is None:
            return x[self.a], x[self.b]
        return x[self.a] - x[self.base], x[self.b] - x[self.base]

    def observe(self, pass_idx: int, x: torch.Tensor, row0: int) -> None:
        u, v = self._xy(x)
        prods = (u * u, v * v, u * v)
        if self.layout == "flat":
            for acc, p in zip(self._flat, prods):
                acc.add(row_sums(p))
        else:  # per column: add row after row, the same order whatever the chunks
            stacked = torch.stack(prods).double()  # (3, rows, cols)
            for r in range(stacked.shape[1]):
                self._cols += stacked[:, r]

    def end_pass(self, pass_idx: int) -> None:
        if self.layout == "flat":
            xx, yy, xy = (torch.tensor(a.total(), dtype=torch.float64) for a in self._flat)
        else:
            xx, yy, xy = self._cols
        self.c0, self.c1 = _nuslerp_coefficients(self.t, xx, yy, xy)

    def apply(self, x: torch.Tensor, row0: int) -> torch.Tensor:
        u, v = self._xy(x)
        if self.layout == "rows":
            uu, vv = u.double(), v.double()
            c0, c1 = _nuslerp_coefficients(self.t, (uu * uu).sum(1), (vv * vv).sum(1), (uu * vv).sum(1))
            c0, c1 = c0.unsqueeze(1), c1.unsqueeze(1)
        else:
            c0, c1 = self.c0, self.c1
        out = u * c0.to(x.device, x.dtype) + v * c1.to(x.device, x.dtype)
        if self.base is not None:
            out += x[self.base]
        return out


MULTISLERP = MethodDef(
    name="multislerp",
    params=(ParamSpec("weight", "float", "nonbase", required=True),
            ParamSpec("normalize_weights", "bool", "shared", default=True),
            ParamSpec("eps", "float", "shared", default=1e-8)),
    base="optional", min_inputs=1, max_inputs=None, make=MultiSlerp, min_others=1,
    cost=lambda ctx: Cost(0 if len(ctx.others) == 1 else 1, 4.0, any_order=True),
    pretty="Multi-SLERP", url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
KARCHER = MethodDef(
    name="karcher",
    params=(ParamSpec("max_iter", "int", "shared", default=10), ParamSpec("tol", "float", "shared", default=1e-5)),
    base="ignored", min_inputs=1, max_inputs=None, make=Karcher,
    cost=lambda ctx: Cost(0 if ctx.n_inputs == 1 else 1, 4.0, any_order=True),
    pretty="Karcher Mean", url="https://en.wikipedia.org/wiki/Karcher_mean",
)
NUSLERP = MethodDef(
    name="nuslerp",
    params=(ParamSpec("weight", "float", "nonbase", required=True),
            ParamSpec("nuslerp_row_wise", "bool", "shared", default=False),
            ParamSpec("nuslerp_flatten", "bool", "shared", default=True)),
    base="optional", min_inputs=2, max_inputs=3, make=NuSlerp, min_others=2, max_others=2,
    cost=lambda ctx: Cost(0 if nuslerp_layout(ctx) == "rows" else 1, 5.0), check=nuslerp_check,
    pretty="NuSLERP", url="https://en.wikipedia.org/wiki/Slerp",
)

"""What a merge did to each tensor, recorded as it runs, for `streammerge report`.

Imports methods (and torch, numpy). Per output tensor and input: the input's norm, its delta's
norm against the base, the output's cosine similarity to it (the output as written, in its
dtype); from sparsifying methods the share of each delta's elements kept, and from TIES-style
consensus the share of each input's nonzero delta that agrees with the elected sign. Sums are
per-row float64 values kept by row and added once at the end in a fixed order, so the record is
the same whatever the chunking (as output bytes are); counts are integers. Everything looks at
every stride-th row (stride_for). The per-row values cost at most 24 bytes per row and input
(budget.py counts them), the statistics a copy of the sampled rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .budget import stride_for
from .methods import Tally, fused
from .methods.base import exact_total, row_sums


def sampled(row0: int, row1: int, stride: int) -> range:
    """The rows in [row0, row1) the statistics look at."""
    return range(-(-row0 // stride) * stride, row1, stride)


class TensorStats:
    """Statistics of one task's merge, fed the apply pass's sub-chunks in any chunking."""

    def __init__(self, n_inputs: int, rows: int, base: int | None) -> None:
        self.base = base
        self.stride = stride_for(rows)
        n = len(sampled(0, rows, self.stride))
        self._rows = np.zeros((3, n_inputs, n), dtype=np.float64)  # Σx², Σ(x−base)², Σ out·x per sampled row
        self._out = np.zeros(n, dtype=np.float64)  # Σ out² per sampled row
        self.tally = Tally(n_inputs)

    def before(self, x: torch.Tensor, row0: int) -> tuple[slice, torch.Tensor, int] | None:
        """Before the apply pass on rows row0.. of the inputs (n, rows, cols), which it may overwrite:
        the sampled rows' positions in the chunk, a copy of them (bfloat16 rows as read, which the
        op widens to float32 as it loads them, widened), and the first one's row (None when the
        chunk holds no sampled row). The kernel's tally counts those rows."""
        picked = sampled(row0, row0 + x.shape[1], self.stride)
        if not len(picked):
            self.tally.pick = None
            return None
        rows = slice(picked.start - row0, picked.stop - row0, picked.step)
        self.tally.pick = rows
        picks = x[:, rows]  # a strided copy: index_select cost 3x as much
        return rows, picks.float() if picks.dtype == torch.bfloat16 else picks.clone(), picked.start

    def after(self, before: tuple[slice, torch.Tensor, int], y: torch.Tensor) -> None:
        """The apply pass gave rows y for the chunk `before` was taken of, as they are written (in
        the output dtype: the output's figures are the written model's)."""
        rows, x, row0 = before
        self.add(x, y[rows], row0)

    def add(self, x: torch.Tensor, y: torch.Tensor, row0: int) -> None:
        """Sampled rows (from `sampled`, the first being row0) of the inputs as they were before the
        apply pass (n, k, cols), and the same rows of the output."""
        n, k, cols = x.shape
        first = row0 // self.stride
        rows = slice(first, first + k)
        yx = y.to(x.dtype)
        parts = 3 if self.base is not None else 2
        sums = fused.product_sums(x, yx, self.base)  # one compiled loop, the same bits, where loaded
        if sums is None:
            sums = self._torch_sums(x, yx)
        self._rows[0, :, rows] = sums[:n]
        if self.base is not None:
            self._rows[1, :, rows] = sums[n:2 * n]
        self._rows[2, :, rows] = sums[(parts - 1) * n:parts * n]
        self._out[rows] = sums[parts * n]

    def _torch_sums(self, x: torch.Tensor, yx: torch.Tensor) -> np.ndarray:
        """add's sums in torch: (parts · n + 1, k), as fused.product_sums gives them."""
        n, k, cols = x.shape
        # every product in one buffer, summed by one row_sums call: x², (x − base)², x·out per input
        # and out², each row's sum the one a call of its own gives (row_sums: a row's sum does not
        # depend on the rows beside it). The sampled rows are few; a call per product cost more in
        # Python and torch's dispatch than in arithmetic (0.45 of a linear merge's 4.5 CPU seconds).
        parts = 3 if self.base is not None else 2
        prod = torch.empty(parts * n + 1, k, cols, dtype=x.dtype, device=x.device)
        torch.mul(x, x, out=prod[:n])
        if self.base is not None:
            d = torch.sub(x, x[self.base], out=prod[n:2 * n])
            d.mul_(d)
        torch.mul(x, yx, out=prod[(parts - 1) * n:parts * n])
        torch.mul(yx, yx, out=prod[parts * n])
        return _sums(prod)

    def record(self) -> dict[str, object]:
        """The tensor's record: lists per input (None where a figure does not apply)."""
        xx = [exact_total(r) for r in self._rows[0]]
        dd = [exact_total(r) for r in self._rows[1]]
        xy = [exact_total(r) for r in self._rows[2]]
        yy = exact_total(self._out)
        t = self.tally
        return {
            "norm": [math.sqrt(v) for v in xx],
            "delta": None if self.base is None else [math.sqrt(v) for v in dd],
            "cosine": [xy[i] / math.sqrt(xx[i] * yy) if xx[i] > 0 and yy > 0 else None for i in range(len(xx))],
            "out_norm": math.sqrt(yy),
            "kept": [k / s if k is not None and s else None for k, s in zip(t.kept, t.seen)] if t.used else None,
            "agree": [a / z if a is not None and z else None for a, z in zip(t.agree, t.nonzero)]
            if t.used and any(a is not None for a in t.agree) else None,
        }


def _sums(x: torch.Tensor) -> np.ndarray:
    """Float64 sums over the last axis, each alike whatever its neighbours (row_sums)."""
    return row_sums(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1]).cpu().numpy()

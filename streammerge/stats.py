"""What a merge did to each tensor, recorded as it runs, for `streammerge report`.

Imports methods (and torch, numpy). Per output tensor and input: the input's norm, its delta's
norm against the base, the output's cosine similarity to it; from sparsifying methods the share
of each delta's elements kept, and from TIES-style consensus the share of each input's nonzero
delta that agrees with the elected sign. Sums are per-row float64 values kept by row and added
once at the end in a fixed order, so the record is the same whatever the chunking (as output bytes
are); counts are integers. The per-row values cost 24 bytes per row and input (budget.py counts
them), the statistics a copy of the sub-chunk being merged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .methods import Tally
from .methods.base import row_sums


class TensorStats:
    """Statistics of one task's merge, fed the apply pass's sub-chunks in any chunking."""

    def __init__(self, n_inputs: int, rows: int, base: int | None) -> None:
        self.base = base
        self._rows = np.zeros((3, n_inputs, rows), dtype=np.float64)  # Σx², Σ(x−base)², Σ out·x per row
        self._out = np.zeros(rows, dtype=np.float64)  # Σ out² per row
        self.tally = Tally(n_inputs)

    def add(self, x: torch.Tensor, y: torch.Tensor, row0: int) -> None:
        """Inputs x (n, rows, cols) as they were before the apply pass, and the merged rows y."""
        rows = slice(row0, row0 + x.shape[1])
        yx = y.to(x.dtype)
        for i in range(x.shape[0]):  # one input at a time: two rows of temporaries at most
            xi = x[i]
            self._rows[0, i, rows] = _row_sums(xi * xi)
            if self.base is not None:
                d = xi - x[self.base]
                self._rows[1, i, rows] = _row_sums(d.mul_(d))
            self._rows[2, i, rows] = _row_sums(xi * yx)
        self._out[rows] = _row_sums(yx * yx)

    def record(self, numel: int) -> dict[str, object]:
        """The tensor's record: lists per input (None where a figure does not apply)."""
        xx = [math.fsum(r) for r in self._rows[0]]
        dd = [math.fsum(r) for r in self._rows[1]]
        xy = [math.fsum(r) for r in self._rows[2]]
        yy = math.fsum(self._out)
        t = self.tally
        return {
            "norm": [math.sqrt(v) for v in xx],
            "delta": None if self.base is None else [math.sqrt(v) for v in dd],
            "cosine": [xy[i] / math.sqrt(xx[i] * yy) if xx[i] > 0 and yy > 0 else None for i in range(len(xx))],
            "out_norm": math.sqrt(yy),
            "kept": [k / numel if k is not None and numel else None for k in t.kept] if t.used else None,
            "agree": [a / z if a is not None and z else None for a, z in zip(t.agree, t.nonzero)]
            if t.used and any(a is not None for a in t.agree) else None,
        }


def _row_sums(x: torch.Tensor) -> np.ndarray:
    return row_sums(x).cpu().numpy()

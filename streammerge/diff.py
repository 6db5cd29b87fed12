"""Compare two model folders tensor by tensor: shape, dtype, largest and relative error, cosine,
and how many elements differ by more than one unit in the last place of their dtype; summarised
per layer. The way to set a streammerge output beside a mergekit one, or two recipes side by side.

Imports index, format, dtypes, errors (and torch). Reads each tensor in row slices of at most
`chunk_bytes` per side and reduces them in float64, so memory stays small whatever the models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .dtypes import itemsize
from .errors import InputError
from .index import ModelIndex

# one unit in the last place, relative, per dtype: the rounding two correct merges may differ by
ULP = {"BF16": 2.0**-7, "F16": 2.0**-10, "F32": 2.0**-23, "F64": 2.0**-52}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class TensorDiff:
    name: str
    shape: tuple[tuple[int, ...], tuple[int, ...]]
    dtype: tuple[str, str]
    numel: int = 0
    max_abs: float = 0.0  # largest |a - b|
    rel: float = 0.0  # ‖a − b‖ / ‖a‖ (‖a − b‖ when a is zero)
    cosine: float = 1.0
    beyond_ulp: int = 0  # elements where |a − b| > one ulp of the coarser dtype times max(|a|, |b|)
    identical: bool = True  # the same bytes

    @property
    def comparable(self) -> bool:
        return self.shape[0] == self.shape[1]

    @property
    def layer(self) -> str:
        m = _LAYER.search(self.name)
        return f"layer {int(m.group(1))}" if m else "other"


@dataclass
class DiffReport:
    a: str
    b: str
    tensors: list[TensorDiff] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """"identical" (every byte), "equal within rounding" (no element beyond one ulp), or "different"."""
        if self.only_a or self.only_b or any(not t.comparable for t in self.tensors):
            return "different"
        if all(t.identical for t in self.tensors):
            return "identical"
        return "equal within rounding" if all(t.beyond_ulp == 0 for t in self.tensors) else "different"

    def by_layer(self) -> list[tuple[str, int, float, float, int]]:
        """(layer, tensors, largest relative error, smallest cosine, elements beyond one ulp) per layer,
        layers in order, then the rest."""
        groups: dict[str, list[TensorDiff]] = {}
        for t in self.tensors:
            if t.comparable:
                groups.setdefault(t.layer, []).append(t)

        def key(name: str) -> tuple[int, int]:
            return (0, int(name.split()[1])) if name.startswith("layer ") else (1, 0)

        return [(name, len(ts), max(t.rel for t in ts), min(t.cosine for t in ts), sum(t.beyond_ulp for t in ts))
                for name, ts in sorted(groups.items(), key=lambda kv: key(kv[0]))]


def diff_folders(a: str, b: str, chunk_bytes: int = 32 << 20) -> DiffReport:
    """Compare every tensor two model folders (safetensors or .bin) share.

    Raises:
        InputError: a folder is not a model folder, or a shard cannot be read.
    """
    ia, ib = ModelIndex(a, a), ModelIndex(b, b)
    try:
        rep = DiffReport(a, b, only_a=sorted(set(ia.tensors) - set(ib.tensors)),
                         only_b=sorted(set(ib.tensors) - set(ia.tensors)))
        for name in sorted(set(ia.tensors) & set(ib.tensors), key=_order):
            rep.tensors.append(_diff_tensor(ia, ib, name, chunk_bytes))
        return rep
    finally:
        ia.close()
        ib.close()


def _order(name: str) -> tuple[int, int, str]:
    m = _LAYER.search(name)
    return (1, int(m.group(1)), name) if m else (0 if "embed" in name else 2, 0, name)


def _diff_tensor(ia: ModelIndex, ib: ModelIndex, name: str, chunk_bytes: int) -> TensorDiff:
    ra, rb = ia.tensors[name], ib.tensors[name]
    ea, eb = ra.entry, rb.entry
    d = TensorDiff(name, (ea.shape, eb.shape), (ea.dtype, eb.dtype), ea.numel)
    if ea.shape != eb.shape:
        d.identical = False
        return d
    ulp = max(ULP.get(ea.dtype, 0.0), ULP.get(eb.dtype, 0.0))
    step = max(1, chunk_bytes // max(1, ra.cols * max(itemsize(ea.dtype), itemsize(eb.dtype))))
    aa = bb = ab = dd = 0.0
    try:
        for r0 in range(0, ra.rows, step):
            r1 = min(ra.rows, r0 + step)
            xa, xb = ia.read_rows(name, r0, r1), ib.read_rows(name, r0, r1)
            if d.identical and (ea.dtype != eb.dtype or not torch.equal(xa.view(torch.uint8), xb.view(torch.uint8))):
                d.identical = False
            fa, fb = xa.to(torch.float64), xb.to(torch.float64)
            diff = fa - fb
            aa += float((fa * fa).sum())
            bb += float((fb * fb).sum())
            ab += float((fa * fb).sum())
            dd += float((diff * diff).sum())
            absdiff = diff.abs()
            d.max_abs = max(d.max_abs, float(absdiff.max()) if absdiff.numel() else 0.0)
            tol = ulp * torch.maximum(fa.abs(), fb.abs())
            d.beyond_ulp += int((absdiff > tol).sum())
    except (OSError, ValueError) as e:
        raise InputError(f"tensor {name}: cannot be read ({e})") from None
    d.rel = math.sqrt(dd) / math.sqrt(aa) if aa > 0 else math.sqrt(dd)
    d.cosine = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else (1.0 if aa == bb else 0.0)
    return d

"""Byte sizes, read and written one way everywhere: `512MiB`, `2GiB`, `5B` in, `1.50 GiB` out.

Imports nothing of the package. Sizes written for people use binary units (KiB, MiB, GiB),
as `--max-memory` and the progress bar do; sizes read accept both kinds and mergekit's `5B`
(billions, its shard-size unit).
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "b": 10**9,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int, what: str = "size", positive: bool = False) -> int:
    """Bytes from `512M`, `2GiB`, `5B` (mergekit's billions), `1000000` or an int.

    Raises:
        ValueError: not a size (or, with `positive`, not more than 0), saying what was expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size; write e.g. 512M, 2GiB or 5B")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: {value!r} is not a size; write e.g. 512M, 2GiB or 5B")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if positive and size <= 0:
        raise ValueError(f"{what}: {value!r} must be more than 0 bytes")
    return size


def size_str(n: float) -> str:
    """`1.50 GiB`, `512.00 MiB`, `3.00 KiB`, `12 B`: two decimals in the largest binary unit that fits."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def mib_str(n: int, up: bool = False) -> str:
    """`512MiB` as an option value, whole MiB (rounded up with `up`, and never `0MiB` for a nonzero size)."""
    mib = -(-n // (1 << 20)) if up or 0 < n < (1 << 20) else n // (1 << 20)
    return f"{mib}MiB"

"""streammerge: a memory-frugal, out-of-core, resumable merger for mergekit configs."""

from __future__ import annotations

__version__ = "0.1.0"

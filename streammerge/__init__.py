"""streammerge: a memory-frugal, out-of-core, resumable merger for mergekit configs.

    import streammerge
    streammerge.plan("merge.yml")                       # what will happen, no tensor data read
    streammerge.merge("merge.yml", "merged", max_memory="2GiB")
    streammerge.verify("merged")

The API is loaded on first use, so `import streammerge` stays light.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["RunOptions", "merge", "plan", "plans", "verify", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("merge", "plan", "plans", "verify", "RunOptions"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'streammerge' has no attribute {name!r}")

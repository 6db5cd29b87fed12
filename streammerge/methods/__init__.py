"""The merge-method registry: one table of every method streammerge runs.

Imports the method modules only. Each method is a MethodDef (contract, parameters) whose
`make` builds a per-tensor MergeOp; see base.py for how ops are fed.
"""

from __future__ import annotations

from .base import MergeOp, MethodDef, TaskContext
from .linear import LINEAR
from .slerp import SLERP
from .task_arithmetic import BREADCRUMBS, BREADCRUMBS_TIES, DARE_LINEAR, DARE_TIES, TASK_ARITHMETIC, TIES

METHODS: dict[str, MethodDef] = {
    m.name: m
    for m in (LINEAR, SLERP, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES, BREADCRUMBS, BREADCRUMBS_TIES)
}

# mergekit methods that exist but are not implemented here yet (issue: every mergekit method)
PLANNED = ("della", "della_linear", "model_stock", "sce",
           "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
           "passthrough")

__all__ = ["METHODS", "PLANNED", "MergeOp", "MethodDef", "TaskContext"]

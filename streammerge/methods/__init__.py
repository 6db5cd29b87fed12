"""The merge-method registry: one table of every method streammerge runs.

Imports the method modules only. Each method is a MethodDef (contract, parameters) whose
`make` builds a per-tensor MergeOp; see base.py for how ops are fed.
"""

from __future__ import annotations

from .arcee_fusion import ARCEE_FUSION
from .base import ARITHMETIC, Cost, MergeOp, MethodDef, Tally, TaskContext
from .elementwise import NEARSWAP, PASSTHROUGH, RAM, RAMPLUS_TL
from .linear import LINEAR
from .model_stock import MODEL_STOCK
from .sce import SCE
from .slerp import SLERP
from .spherical import KARCHER, MULTISLERP, NUSLERP
from .task_arithmetic import (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DARE_LINEAR,
    DARE_TIES,
    DELLA,
    DELLA_LINEAR,
    TASK_ARITHMETIC,
    TIES,
)

METHODS: dict[str, MethodDef] = {
    m.name: m
    for m in (LINEAR, SLERP, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES, BREADCRUMBS, BREADCRUMBS_TIES,
              PASSTHROUGH, NEARSWAP, RAM, RAMPLUS_TL, MODEL_STOCK, MULTISLERP, KARCHER, NUSLERP, DELLA, DELLA_LINEAR,
              SCE, ARCEE_FUSION)
}

__all__ = ["ARITHMETIC", "METHODS", "Cost", "MergeOp", "MethodDef", "Tally", "TaskContext"]

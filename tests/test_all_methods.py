"""Every registered merge method runs end to end through the streaming executor on tiny
Mistral-shaped models, at a tight budget (one-row blocks), with finite output that verifies."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_golden
from safetensors import safe_open

from streammerge.budget import widest_row
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.methods import METHODS
from streammerge.options import RunOptions
from streammerge.planner import make_plan
from streammerge.schedule import make_schedule
from streammerge.verifier import verify

TASK = "{weight: 0.4, density: 0.6}"
RECIPES = {  # method: (model lines, global parameters); M0 is the base
    "linear": ("M0:{weight: 1}|M1:{weight: 2}", ""),
    "slerp": ("M0|M1", "t: 0.3"),
    "nuslerp": ("M0|M1:{weight: 0.4}|M2:{weight: 0.6}", ""),
    "multislerp": ("M0|M1:{weight: 1}|M2:{weight: 2}|M3:{weight: 1}", ""),
    "karcher": ("M1|M2|M3", ""),
    "passthrough": ("M1:{scale: 0.5}", ""),
    "model_stock": ("M0|M1|M2|M3", ""),
    "arcee_fusion": ("M0|M1", ""),
    "nearswap": ("M0|M1", "t: 0.001"),
    "sce": ("M0|M1|M2|M3", "select_topk: 0.5"),
    "ram": ("M0|M1|M2|M3", ""),
    "ramplus_tl": ("M0|M1|M2|M3", ""),
    "task_arithmetic": (f"M0|M1:{TASK}|M2:{TASK}", ""),
    "ties": (f"M0|M1:{TASK}|M2:{TASK}", ""),
    "dare_linear": (f"M0|M1:{TASK}|M2:{TASK}", ""),
    "dare_ties": (f"M0|M1:{TASK}|M2:{TASK}", ""),
    "breadcrumbs": (f"M0|M1:{TASK}|M2:{TASK}", "gamma: 0.05"),
    "breadcrumbs_ties": (f"M0|M1:{TASK}|M2:{TASK}", "gamma: 0.05"),
    "della": (f"M0|M1:{TASK}|M2:{TASK}", "epsilon: 0.1"),
    "della_linear": (f"M0|M1:{TASK}|M2:{TASK}", "epsilon: 0.1"),
}


def test_recipes_cover_every_method() -> None:
    assert set(RECIPES) == set(METHODS)


def config_text(method: str, folders: list[str]) -> str:
    models, params = RECIPES[method]
    lines = [f"merge_method: {method}"]
    if "M0" in models and method not in ("linear", "passthrough", "karcher"):
        lines.append(f"base_model: {folders[0]}")
    lines.append("models:")
    for item in models.split("|"):
        name, _, p = item.partition(":")
        lines.append(f"  - model: {folders[int(name[1])]}" + (f"\n    parameters: {p}" if p else ""))
    if params:
        lines.append(f"parameters: {{{params}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_method_end_to_end(method, tiny_set, tmp_path) -> None:
    plan = make_plan(parse_config(config_text(method, tiny_set)))
    out = str(tmp_path / "out")
    tight = RunOptions(max_memory=1 << 34, chunk_bytes=widest_row(plan)[0] * 2)  # blocks of a row or two
    # where the method's statistics may see the blocks in any order, this schedule runs them backwards
    # and forwards by turns (a block shared at each turn), and its bytes are the golden ones below
    turns = [s for t in make_schedule(plan, 1 << 34, False, tight.chunk_bytes).tasks for s in t.steps[1:-1]
             if len(s.passes) > 1]
    assert bool(turns) == any(t.cost.any_order and t.cost.stat_passes for t in plan.tasks)
    Executor(plan, out, tight).run()
    assert verify(out).tensors == 39
    assert_golden(f"method/{method}", out)
    whole = str(tmp_path / "whole")  # every tensor read once, whole: the other schedule, the same bytes
    Executor(plan, whole, RunOptions(max_memory=1 << 34, chunk_bytes=1 << 30)).run()
    assert_golden(f"method/{method}", whole)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 39 and all(torch.isfinite(t.float()).all() for t in tensors.values())
    with open(os.path.join(out, "streammerge.manifest.json")) as fh:
        assert json.load(fh)["merge_method"] == method

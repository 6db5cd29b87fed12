"""Narrow blocks (budget.block_dtype): a method without statistics passes keeps bfloat16 and
float16 inputs in their own dtype in a CPU block, and each sub-chunk is converted as it is
computed; it writes the bytes it writes from float32 blocks, whatever the schedule, and with the
config's `dtype` cast too. Methods with statistics passes keep float32 blocks, unless the compiled
loops are in use and take bfloat16 as read in all passes but one (DARE-TIES: all of them; TIES,
SLERP: all but the apply pass)."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import output_digest
from test_all_methods import RECIPES, config_text

from streammerge import budget, reader, schedule
from streammerge.budget import block_dtype, widest_row
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.methods import METHODS, fused
from streammerge.options import RunOptions
from streammerge.planner import TaskInput, make_plan


def _wide(task) -> str:  # the blocks as they were before: the compute dtype
    return str(task.compute)


@pytest.mark.parametrize("method,cast,jit", [(m, None, "0") for m in sorted(RECIPES)]
                         + [(m, None, "1") for m in sorted(RECIPES) if METHODS[m].jit]
                         + [("linear", "float16", "0"), ("task_arithmetic", "float16", "0"),
                            ("dare_ties", "float16", "1"), ("linear", "float32", "0")])
def test_narrow_blocks_write_the_bytes_of_compute_dtype_blocks(method, cast, jit, tiny_set, tmp_path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("STREAMMERGE_JIT", jit)  # the compiled loops (where numba is) in every run below
    text = config_text(method, tiny_set) + (f"dtype: {cast}\n" if cast else "")
    plan = make_plan(parse_config(text))
    budget.loops_for(plan)  # as the executor decides before it schedules
    merged = [t for t in plan.tasks if not t.copy_exact]
    narrow = {None: "BF16", "float16": "F16", "float32": "F32"}[cast]  # (the tiny set is bfloat16)

    def expected(t) -> str:  # the passes that would widen each sub-chunk: at most one for a narrow block
        raw = t.cost.raw_passes if jit == "1" and narrow == "BF16" and fused.kernels() is not None else 0
        return narrow if t.cost.stat_passes + 1 - raw <= 1 else t.compute

    assert merged and all(block_dtype(t) == expected(t) for t in merged)
    if all(block_dtype(t) == t.compute for t in merged):
        return  # every block is the compute dtype's: nothing to compare
    rows = str(tmp_path / "narrow")  # blocks of a row or two
    Executor(plan, rows, RunOptions(max_memory=1 << 34, chunk_bytes=widest_row(plan)[0] * 2)).run()
    for mod in (budget, schedule, reader):
        monkeypatch.setattr(mod, "block_dtype", _wide)
    wide = str(tmp_path / "wide")  # every tensor whole (test_all_methods has the narrow whole ones)
    Executor(plan, wide, RunOptions(max_memory=1 << 34, chunk_bytes=1 << 30)).run()
    assert output_digest(rows) == output_digest(wide)


def test_block_dtype_is_the_one_narrower_dtype_inputs_load_in(tiny_set) -> None:
    plan = make_plan(parse_config(config_text("linear", tiny_set)))
    task = next(t for t in plan.tasks if not t.copy_exact)
    inputs = task.inputs

    def with_(dtypes: list[str], load: str | None = None, compute: str = "F32"):
        ins = tuple(TaskInput(i.model, i.tensor, d) for i, d in zip(inputs, dtypes))
        return dataclasses.replace(task, inputs=ins, load_dtype=load, compute=compute)

    assert block_dtype(with_(["BF16"] * 3)) == "BF16"
    assert block_dtype(with_(["F16"] * 3)) == "F16"
    assert block_dtype(with_(["BF16", "F16", "BF16"])) == "F32"  # mixed: converted as read
    assert block_dtype(with_(["BF16", "F16", "F32"], load="BF16")) == "BF16"  # all cast to one dtype
    assert block_dtype(with_(["BF16"] * 3, load="F32")) == "F32"
    assert block_dtype(with_(["F32"] * 3)) == "F32"
    assert block_dtype(with_(["F64"] * 3, compute="F64")) == "F64"
    assert block_dtype(with_(["BF16"] * 3, compute="F64")) == "BF16"
    assert block_dtype(dataclasses.replace(with_(["BF16"] * 3), copy_exact=True)) == "F32"
    passes = dataclasses.replace(with_(["BF16"] * 3), cost=dataclasses.replace(task.cost, stat_passes=1))
    assert block_dtype(passes) == "F32"  # each pass would convert the block again

"""Pipelines (mergekit-multi's multi-document format): stages run in order, later ones using
earlier outputs by name; killed in its second stage and rerun, the first stage is skipped and
the second resumed, ending with the bytes of an uninterrupted run; a changed first stage is
redone and so is everything after it."""

from __future__ import annotations

import json
import os
import signal

from test_resume import run  # one kill-and-resume runner for the tests that kill merges


def pipeline(tmp_path, folders: list[str], density: float = 0.5) -> str:
    text = f"""name: blend
merge_method: ties
base_model: {folders[0]}
models:
  - model: {folders[0]}
  - model: {folders[1]}
    parameters: {{weight: 0.6, density: {density}}}
  - model: {folders[2]}
    parameters: {{weight: 0.4, density: {density}}}
dtype: bfloat16
---
name: final
merge_method: slerp
base_model: blend
slices:
  - sources:
      - model: blend
        layer_range: [0, 4]
      - model: {folders[3]}
        layer_range: [0, 4]
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.3}}]
"""
    path = tmp_path / f"pipe-{density}.yml"
    path.write_text(text)
    return str(path)


def files(out: str) -> dict[str, object]:
    """Every file's bytes; of the manifest, the tensor and shard hashes (it also records where
    and when its inputs were written, and stage 2's input is stage 1's folder)."""
    out_files: dict[str, object] = {}
    for n in sorted(os.listdir(out)):
        with open(os.path.join(out, n), "rb") as f:
            data = f.read()
        if n == "streammerge.manifest.json":
            m = json.loads(data)
            out_files[n] = ({k: v["xxh3_128"] for k, v in m["tensors"].items()}, m["shards"])
        else:
            out_files[n] = data
    return out_files


def test_pipeline_killed_in_second_stage_resumes(tiny_set, tmp_path) -> None:
    cfg = pipeline(tmp_path, tiny_set)
    clean = str(tmp_path / "clean" / "out")
    trace = str(tmp_path / "trace")
    r = run(cfg, clean, trace=trace)
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(clean + ".stages/blend") and "stage 2/2 final" in r.stderr
    with open(trace) as f:
        points = [line.split()[1] for line in f]
    first_stage_end = points.index("finished")
    kill_at = first_stage_end + 1 + (len(points) - first_stage_end) // 2  # mid second stage
    out = str(tmp_path / "o" / "out")
    assert run(cfg, out, crash_at=kill_at).returncode == -signal.SIGKILL
    assert os.path.isfile(out + ".stages/blend/streammerge.manifest.json")
    r = run(cfg, out)
    assert r.returncode == 0, r.stderr
    assert "stage 1: up to date" in r.stderr and "resuming an interrupted run" in r.stderr
    assert files(out) == files(clean)
    assert files(out + ".stages/blend") == files(clean + ".stages/blend")


def test_changed_first_stage_redoes_both(tiny_set, tmp_path) -> None:
    out = str(tmp_path / "out")
    assert run(pipeline(tmp_path, tiny_set, 0.5), out).returncode == 0
    before = files(out)
    r = run(pipeline(tmp_path, tiny_set, 0.7), out)
    assert r.returncode == 0, r.stderr
    assert "stage 1: done" in r.stderr and "stage 2: done" in r.stderr
    first = sorted(n for n in before if n.endswith(".safetensors"))[0]
    assert files(out)[first] != before[first]
    r = run(pipeline(tmp_path, tiny_set, 0.7), out)
    assert "stage 1: up to date" in r.stderr and "stage 2: up to date" in r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "streammerge.manifest.json").write_text(
        '{"config": "something else", "plan_fingerprint": "0123"}')  # a finished merge of another recipe
    r = run(pipeline(tmp_path, tiny_set, 0.7), str(tmp_path / "mine"))
    assert r.returncode == 6 and "--overwrite" in r.stderr  # an output of another recipe is not replaced


def _wide_pipeline(tmp_path, first: int, second: int) -> tuple[list, list]:  # type: ignore[type-arg]
    """Nine models whose down_proj rows are 262,144 wide; a pipeline whose stage 1 ("one") merges
    the first `first` of them, and stage 2 ("two") its result with the next `second` - 1; its plans."""
    import dataclasses

    import make_models

    from streammerge.pipeline import check_pipeline
    from streammerge.planner import parse

    shape = dataclasses.replace(make_models.PRESETS["tiny"], hidden=8, intermediate=262144, layers=1, heads=2,
                                kv_heads=1, vocab=16)
    folders = [str(tmp_path / f"m{k}") for k in range(9)]
    make_models.write_set(folders, shape, seed=6)

    def models(names: list[str]) -> str:
        return "".join(f"  - {{model: {n}, parameters: {{weight: 1}}}}\n" for n in names)

    configs = parse(f"name: one\nmerge_method: linear\nmodels:\n{models(folders[:first])}---\n"
                    f"name: two\nmerge_method: linear\nmodels:\n{models(['one', *folders[first:first + second - 1]])}",
                    "wide.yml")
    return configs, check_pipeline(configs, str(tmp_path / "out"))


def test_a_later_stage_too_wide_for_the_budget_is_refused_before_the_first_runs(tmp_path) -> None:
    """Stage 2 merges eight inputs whose down_proj rows are 262,144 wide, stage 1 two: a budget
    between what they need ran stage 1 to the end and refused stage 2 only then. Now nothing runs,
    and the figure asked for is stage 2's. (The margins are tens of MiB: a process's RSS drifts by
    that much between measurements, here a test worker's.)"""
    import pytest

    import streammerge
    from streammerge.budget import baseline_bytes, smallest_budget
    from streammerge.errors import PlanError
    from streammerge.pagecache import trim_heap

    configs, plans = _wide_pipeline(tmp_path, 2, 8)
    out = str(tmp_path / "out")
    trim_heap()  # (as the pipeline does before it measures: making the models left freed memory)
    base = baseline_bytes()
    first, second = (smallest_budget(p, base) for p in plans)
    assert second - first > 150 << 20  # the fixture
    budget = first + (48 << 20)  # what stage 1 needs and more, far less than stage 2 does
    with pytest.raises(PlanError) as e:
        streammerge.merge(configs, out, max_memory=budget)
    assert str(e.value).startswith("stage 2/2 two (checked before any stage runs): --max-memory")
    assert "tensor 'model.layers.0.mlp.down_proj.weight'" in str(e.value)
    asked = int(str(e.value).rsplit("--max-memory ", 1)[1].removesuffix("MiB")) << 20
    assert asked - budget > 64 << 20  # stage 2's figure, not stage 1's
    assert not os.path.exists(out + ".stages") and not os.path.exists(out)


def test_a_budget_at_a_later_stages_edge_is_refused_before_the_first_runs(tmp_path) -> None:
    """A budget just above what stage 2 needs as measured before any stage runs: stage 2, once
    stage 1 has run in the process, holds more (13-18 MiB on the seed pipeline) and refused it then,
    after stage 1's work. Now nothing runs, and the budget asked for leaves stage 2 the room."""
    import pytest

    import streammerge
    from streammerge.budget import GROWTH_BYTES, baseline_bytes, smallest_budget
    from streammerge.errors import PlanError
    from streammerge.pagecache import trim_heap

    configs, plans = _wide_pipeline(tmp_path, 2, 8)
    out = str(tmp_path / "out")
    trim_heap()
    second = smallest_budget(plans[1], baseline_bytes())
    budget = second + (2 << 20)
    with pytest.raises(PlanError) as e:
        streammerge.merge(configs, out, max_memory=budget)
    assert str(e.value).startswith("stage 2/2 two (checked before any stage runs): --max-memory")
    assert "more a stage's process may hold once the stages before it ran" in str(e.value)
    asked = int(str(e.value).rsplit("--max-memory ", 1)[1].removesuffix("MiB")) << 20
    assert asked >= second + GROWTH_BYTES - (4 << 20)  # (the worker's memory drifts by a few MiB)
    assert not os.path.exists(out + ".stages") and not os.path.exists(out)


# The two-stage merge of test_a_later_stage_measures_only_what_the_process_still_holds in a fresh
# process (argv: the tests' and tools' folders, a folder to work in): prints the process's memory as
# each stage starts, and whether both ran.
_STAGES_SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path[:0] = sys.argv[1:3]
import psutil
import streammerge
import test_pipeline
from streammerge.budget import baseline_bytes, smallest_budget
from streammerge.executor import Executor
from streammerge.pagecache import trim_heap

tmp = Path(sys.argv[3])
configs, plans = test_pipeline._wide_pipeline(tmp, 5, 5)
trim_heap()
need = max(smallest_budget(p, baseline_bytes()) for p in plans)
held, kinds = [], []
run = Executor.run

def measured(self):
    held.append(psutil.Process().memory_info().rss)
    with open("/proc/self/status") as f:
        kinds.append({k: int(v.split()[0]) >> 10 for k, v in (ln.split(":", 1) for ln in f) if k.startswith("Rss")})
    return run(self)

Executor.run = measured
# (room for either stage, and the GROWTH_BYTES stage 2 is checked with before stage 1 runs, which this
# process's later measurement finds a few MiB above this one)
stats = streammerge.merge(configs, str(tmp / "out"), max_memory=need + (40 << 20))
print(json.dumps({"stages": len(stats), "held": held, "kinds": kinds}))
"""


def test_a_later_stage_measures_only_what_the_process_still_holds(tmp_path) -> None:
    """Two stages of five 262,144-column inputs each: stage 1's freed blocks stayed in glibc's heap,
    and stage 2 counted them as memory the process held, refusing the budget stage 1 had run in
    (20-80 MiB above its figure, refused in 2 of 3 runs). Freed memory now goes back between stages:
    a budget with room for either stage runs both, stage 2 measuring 3-4 MiB above stage 1. In a
    fresh process: a test worker's own history (what earlier tests left in its heap) moved the
    figure by up to 20 MiB."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    tools = os.path.join(here, "..", "tools")
    got = subprocess.run([sys.executable, "-c", _STAGES_SCRIPT, here, tools, str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]  # (a refused stage 2 exits with its PlanError)
    seen = json.loads(got.stdout.strip().splitlines()[-1])
    assert seen["stages"] == 2 and (tmp_path / "out" / "streammerge.manifest.json").exists()
    assert seen["held"][1] - seen["held"][0] < 16 << 20, seen["kinds"]

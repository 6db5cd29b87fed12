"""Run a pipeline: several configs in order, later ones using earlier outputs by name.

Imports executor, output, planner, options, config. Each stage is an ordinary, resumable run into its own
folder; a finished stage whose plan fingerprint is unchanged is skipped, and one whose
config or inputs changed (an earlier stage was redone) is redone. The last stage writes OUT.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import warnings
from dataclasses import dataclass

from .budget import (
    GROWTH_BYTES,
    baseline_bytes,
    choose_loops,
    chunk_budget,
    default_max_memory,
    loops_bytes,
    smallest_budget,
)
from .config import MergeConfig
from .distributed import RayExecutor
from .errors import StreamMergeError
from .executor import Executor, Progress, RunStats
from .options import RunOptions
from .output import manifest_field
from .pagecache import trim_heap
from .planner import Plan, make_plan


@dataclass(frozen=True)
class Stage:
    name: str
    config: MergeConfig
    out: str


def stages(configs: list[MergeConfig], out: str, intermediate_dir: str | None = None) -> list[Stage]:
    """Where each stage writes: intermediates in `intermediate_dir` (default OUT.stages/), the last in OUT."""
    inter = intermediate_dir or os.path.abspath(out).rstrip("/") + ".stages"
    result = []
    for i, cfg in enumerate(configs):
        last = i == len(configs) - 1
        name = cfg.name or f"stage{i + 1}"
        result.append(Stage(name, cfg, out if last else os.path.join(inter, name)))
    return result


def check_pipeline(configs: list[MergeConfig], out: str, options: RunOptions | None = None,
                   quiet: bool = True) -> list[Plan]:
    """Plan every stage before any runs: a later stage against the tensors its predecessors will
    write (names, shapes, dtypes, layer counts), so a mistake in stage 2 is reported in seconds,
    not after stage 1's hour. `quiet` holds back the planner's warnings (a run gives them again as
    each stage is planned to run).

    Raises:
        PlanError, InputError, ConfigError: as make_plan, the message naming the first stage that fails.
    """
    opts = (options or RunOptions()).resolved()
    aliases: dict[str, str | Plan] = {}
    plans: list[Plan] = []
    for i, st in enumerate(stages(configs, out, opts.intermediate_dir)):
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                plan = plan_stage(st.config, opts, aliases)
        except StreamMergeError as e:
            if len(configs) > 1:
                e.args = (f"stage {i + 1}/{len(configs)} {st.name} (checked before any stage runs): {e}",)
            raise
        plans.append(plan)
        aliases[st.name] = plan
    return plans


def check_budgets(plans: list[Plan], names: list[str], options: RunOptions) -> None:
    """A budget that cannot hold one row of some stage's widest tensor is refused before the first
    stage runs, with the figure the widest stage needs: checked only as each stage started, a later
    stage whose rows are wider than the first's was refused after the stages before it had run (on
    real models, hours). The process is measured now, before any stage loaded anything: a stage
    finds it holding as much or more (the seed pipeline's second stage, 13-18 MiB more), so stages
    after the first are checked with budget.GROWTH_BYTES of room for that (a budget that passed
    here within 13 MiB of stage 2's smallest was refused by stage 2, once stage 1 had run); each
    stage's own check, when it starts, stays the final one.

    Raises:
        PlanError: as budget.chunk_budget, the message naming the stage.
    """
    opts = options.resolved()
    if len(plans) < 2 or opts.chunk_bytes is not None or opts.ray is not None:
        return  # (fixed chunk buffers; Ray's workers measure their own processes)
    max_memory = opts.memory_bytes or default_max_memory()
    _give_back_freed()  # memory freed before the pipeline (an API caller's) is not held, as between stages
    base = baseline_bytes()
    plans = [choose_loops(p, max_memory) for p in plans]  # the kernel forms each stage's run will take
    # what a stage's process holds besides: the compiled loops, where it or a stage before it takes
    # them and this process has none loaded (numba's share is loaded once: the largest group's), and
    # for a later stage GROWTH_BYTES of room for what its process holds more once the stages before
    # it ran: its own check, at its start, refused a budget less than that above its smallest, after
    # the stages before it had run; a refusal now asks for a budget with that room (suggested_budget).
    # (Measured without the loops, a refusal under STREAMMERGE_JIT=1 named 352MiB for the seed
    # pipeline, which its stage then refused, holding 407 MiB.)
    loops = list(itertools.accumulate((loops_bytes(p) for p in plans), max))
    rooms = [0] + [GROWTH_BYTES] * (len(plans) - 1)
    need, i = max((smallest_budget(p, base + loops[i]) + rooms[i], i) for i, p in enumerate(plans))
    if max_memory < need:
        try:
            chunk_budget(plans[i], max_memory, base + loops[i], rooms[i])
        except StreamMergeError as e:
            e.args = (f"stage {i + 1}/{len(plans)} {names[i]} (checked before any stage runs): {e}",)
            raise


def plan_stage(cfg: MergeConfig, options: RunOptions, aliases: dict[str, str | Plan] | None = None) -> Plan:
    """make_plan with the options that shape a plan (shard size, seed, vocabulary truncation, device)."""
    opts = options.resolved()
    return make_plan(cfg, opts.shard_bytes, opts.seed, aliases, opts.truncate_vocab, opts.device)


def run_pipeline(configs: list[MergeConfig], out: str, options: RunOptions | None = None,
                 progress: Progress | None = None) -> list[RunStats]:
    """Run every stage in order (one config is a pipeline of one); returns each stage's RunStats."""
    opts = (options or RunOptions()).resolved()
    progress = progress or Progress()
    plan_stages = stages(configs, out, opts.intermediate_dir)
    if len(configs) > 1:
        check_budgets(check_pipeline(configs, out, opts), [st.name for st in plan_stages], opts)
    aliases: dict[str, str | Plan] = {}
    results = []
    for i, st in enumerate(plan_stages):
        last = i == len(plan_stages) - 1
        if len(plan_stages) > 1:
            progress.note(f"stage {i + 1}/{len(plan_stages)} {st.name} -> {st.out}")
            progress.stage(i + 1, len(plan_stages), st.name)
        plan = plan_stage(st.config, opts, aliases)
        # Intermediates are the pipeline's own; OUT is replaced without --overwrite only when it
        # holds this very stage's recipe, made from inputs that have changed since.
        # An intermediate folder is replaced only if this pipeline made it (its manifest says so) —
        # an unrelated merge that happens to sit where a stage would go is refused, not replaced.
        label = None if last else f"{os.path.abspath(out)}::{st.name}"
        own = len(plan_stages) > 1 and (manifest_field(st.out, "config") == st.config.text or (
            label is not None and manifest_field(st.out, "pipeline_stage") == label))
        stage_opts = dataclasses.replace(opts, overwrite=opts.overwrite and last)
        if opts.ray is None:
            executor = Executor(plan, st.out, stage_opts, progress, replace_changed=own, stage=label)
        else:  # workers plan the stage themselves: they need the earlier stages' folders by name
            done = {k: v for k, v in aliases.items() if isinstance(v, str)}
            executor = RayExecutor(plan, st.out, stage_opts, progress, own, label, done)
        results.append(executor.run())
        aliases[st.name] = os.path.abspath(st.out)
        if not last:
            del executor
            _give_back_freed()  # so the next stage measures only what the process still holds
    return results


def _give_back_freed() -> None:
    """What the process freed goes back to the kernel before a budget is measured against it: the
    garbage collector first (a stage's reader leaves cycles holding its buffers), then the heap."""
    gc.collect()
    trim_heap()

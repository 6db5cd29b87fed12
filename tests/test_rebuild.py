"""The executor as reader → runner → committer: the runner runs alone in another process and the
parent commits its rows, byte for byte a normal run; every config `run` rejects, `plan` rejects
too (the API's and the command line's, with the same error and exit code), walking the method
table's invalid parameters; the command line and the API take the same options."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from click.testing import CliRunner
from helpers import ROOMY
from kill_test import snapshot

import streammerge
from streammerge.cli import main
from streammerge.committer import Committer, Progress
from streammerge.errors import ConfigError, OptionError, PlanError, StreamMergeError
from streammerge.executor import Executor
from streammerge.folder import OutputFolder
from streammerge.journal import Journal
from streammerge.methods import METHODS
from streammerge.options import RunOptions
from streammerge.output import finalize
from streammerge.overlap import RingArena
from streammerge.planner import make_plan, parse
from streammerge.reader import InputReader, ReadBlocks
from streammerge.runner import run_task
from streammerge.schedule import make_schedule
from streammerge.stats import TensorStats

CHUNK = 20_000  # bytes of chunk buffers: several blocks per tensor, every pass re-reading


def ties_config(folders: list[str]) -> str:
    lines = ["merge_method: dare_ties", f"base_model: {folders[0]}", "models:", f"  - model: {folders[0]}"]
    for f in folders[1:]:
        lines += [f"  - model: {f}", "    parameters: {weight: 0.4, density: 0.6}"]
    return "\n".join(lines) + "\n"


def _runner_process(text: str, conn) -> None:  # type: ignore[no-untyped-def]
    """A separate process that knows nothing of OUT: it plans the config, then runs each task it is
    sent with the runner over its own reader, and sends back the rows and the inputs' hashes."""
    plan = make_plan(parse(text)[0])
    schedule = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=CHUNK)
    conn.send(plan.fingerprint)
    while (ti := conn.recv()) is not None:
        sched = schedule.only([ti])
        reader = InputReader(plan, torch.device("cpu"), RingArena(sched.arena))
        source = ReadBlocks(reader, sched.reads(), sched.capacity, threaded=False)
        task = plan.tasks[ti]
        stats = None if task.copy_exact else TensorStats(len(task.inputs), task.rows, task.ctx.base)
        for row0, y in run_task(task, sched.tasks[0], source, plan.method, stats):
            conn.send((row0, y.clone()))  # in the output dtype (bfloat16, which numpy lacks)
        conn.send((reader.input_digests(ti), stats.record() if stats else None))
        source.close()


def test_runner_in_another_process_committed_by_the_parent(tiny_set, tmp_path) -> None:
    text = ties_config(tiny_set)
    normal = str(tmp_path / "a" / "out")
    Executor(make_plan(parse(text)[0]), normal, RunOptions(max_memory=1 << 34, chunk_bytes=CHUNK)).run()

    plan = make_plan(parse(text)[0])
    out = str(tmp_path / "b" / "out")
    folder = OutputFolder(out, plan)
    lock = folder.prepare()
    journal = Journal(out, plan.fingerprint, plan.layout_fingerprint, {"config": plan.config.text, "seed": plan.seed})
    committer = Committer(out, plan, journal, Progress())
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_runner_process, args=(text, child))
    worker.start()

    def recv():  # what the worker sent; a worker that died fails the test instead of hanging it
        while not parent.poll(1):
            assert worker.is_alive(), f"the runner process died (exit code {worker.exitcode})"
        return parent.recv()

    try:
        assert recv() == plan.fingerprint  # the worker planned the same merge
        multi_block = 0
        for si, shard in enumerate(plan.shards):
            committer.open_shard(si)
            for ti in shard.tasks:
                task = plan.tasks[ti]
                parent.send(ti)
                committer.start_task(task)
                chunks = 0
                while not isinstance((msg := recv())[0], dict):
                    row0, rows = msg
                    committer.write(task, row0, rows)
                    chunks += 1
                multi_block += chunks > 1
                committer.end_task(task, *msg)
            committer.end_shard()
        parent.send(None)
        worker.join(60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
        journal.close()
    assert multi_block >= 20  # most tensors came back in several pieces
    finalize(plan, out, committer.entries, committer.shard_hashes)
    folder.remove_work()
    lock.release()
    assert snapshot(out) == snapshot(normal)
    assert streammerge.verify(out).tensors == len(plan.tasks)


# --- every config `run` rejects, `plan` rejects -------------------------------------------------

INPUTS = {  # method: model lines (M0 is the base when the method takes one)
    "linear": "M0|M1", "slerp": "M0|M1", "nuslerp": "M0|M1|M2", "multislerp": "M0|M1|M2", "karcher": "M1|M2",
    "passthrough": "M1", "model_stock": "M0|M1|M2|M3", "arcee_fusion": "M0|M1", "nearswap": "M0|M1",
    "sce": "M0|M1|M2", "ram": "M0|M1|M2", "ramplus_tl": "M0|M1|M2",
}
VALID = {"weight": 0.5, "t": 0.3, "density": 0.6, "epsilon": 0.1}
BAD = {"float": "not-a-number", "int": 1.5, "bool": "maybe"}


def config(method: str, folders: list[str], params: dict[str, object]) -> str:
    models = INPUTS.get(method, "M0|M1|M2")
    lines = [f"merge_method: {method}"]
    if METHODS[method].base != "ignored" and "M0" in models:
        lines.append(f"base_model: {folders[0]}")
    lines.append("models:")
    lines += [f"  - model: {folders[int(m[1])]}" for m in models.split("|")]
    if params:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    return "\n".join(lines) + "\n"


def invalid_cases(folders: list[str]) -> list[tuple[str, str]]:
    """(what, config) for every invalid parameter value the method table implies, plus the
    method checks that depend on the tensor (della's density ± epsilon)."""
    cases = []
    for name, m in sorted(METHODS.items()):
        good = {p.name: VALID[p.name] for p in m.params if p.name in VALID and (p.required or p.name == "epsilon")}
        for p in m.params:
            if p.required:
                cases.append((f"{name}: {p.name} missing", config(name, folders, {k: v for k, v in good.items()
                                                                                   if k != p.name})))
            if p.bounds is not None:
                lo, hi = p.bounds
                for bad in (lo - 0.5, hi + 0.5):
                    cases.append((f"{name}: {p.name}={bad}", config(name, folders, {**good, p.name: bad})))
            if p.kind in BAD:
                bad_kind = BAD[p.kind]
                cases.append((f"{name}: {p.name}={bad_kind!r}", config(name, folders, {**good, p.name: bad_kind})))
    for name in ("della", "della_linear"):
        cases.append((f"{name}: density+epsilon >= 1", config(name, folders, {"weight": 0.5, "density": 0.9,
                                                                                "epsilon": 0.2})))
    return cases


def test_plan_rejects_every_config_run_rejects(tiny_set, tmp_path) -> None:
    cases = invalid_cases(tiny_set)
    assert len(cases) >= 40 and any("della" in w for w, _ in cases)
    runner = CliRunner()
    for k, (what, text) in enumerate(cases):
        with pytest.raises(StreamMergeError) as planned:
            streammerge.plan(text)
        out = tmp_path / f"out{k}"
        with pytest.raises(StreamMergeError) as merged:
            streammerge.merge(text, out, max_memory=ROOMY)
        assert type(planned.value) is type(merged.value) and str(planned.value) == str(merged.value), what
        assert isinstance(planned.value, (ConfigError, PlanError)), what
        assert not out.exists(), f"{what}: the rejected run touched OUT"
        cfg = tmp_path / f"c{k}.yml"
        cfg.write_text(text)
        r_plan = runner.invoke(main, ["plan", str(cfg)])
        r_run = runner.invoke(main, ["run", str(cfg), str(out)])
        assert r_plan.exit_code == r_run.exit_code == planned.value.exit_code, (what, r_plan.output, r_run.output)
        assert not out.exists()


def test_della_check_is_a_plan_time_error_naming_the_tensor(tiny_set) -> None:
    text = config("della", tiny_set, {"weight": 0.5, "density": 0.9, "epsilon": 0.2})
    with pytest.raises(PlanError, match="della needs 0 < density - epsilon") as e:
        streammerge.plan(text)
    assert "model.layers.0" in str(e.value) or "model.embed_tokens.weight" in str(e.value)


# --- one set of options -------------------------------------------------------------------------

def test_api_takes_sizes_as_the_cli_does_and_rejects_unknown_options(tiny_set, tmp_path) -> None:
    text = ties_config(tiny_set)
    (stats,) = streammerge.merge(text, tmp_path / "o", max_memory="4GiB", out_shard_size="60K")
    assert stats.shards > 1 and stats.tensors == 39
    with pytest.raises(OptionError, match="max_memory"):
        streammerge.merge(text, tmp_path / "p", max_memory="lots")
    with pytest.raises(OptionError, match="unknown option"):
        streammerge.merge(text, tmp_path / "p", max_memroy="1GiB")
    for threads in (-1, 1025):
        with pytest.raises(OptionError, match=f"num_threads {threads}: give 1 to 1024"):
            streammerge.merge(text, tmp_path / "p", num_threads=threads)
    assert not (tmp_path / "p").exists()
    opts = streammerge.RunOptions(max_memory=ROOMY, copy_tokenizer=False, write_card=False)
    streammerge.merge(text, tmp_path / "q", opts)
    assert not {"README.md", "tokenizer.json"} & set(os.listdir(tmp_path / "q"))


def test_every_run_option_is_an_api_option_and_plan_takes_them(tiny_set, tmp_path) -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(RunOptions)}
    run_params = {p.name for p in main.commands["run"].params if not getattr(p, "hidden", False)}
    plan_params = {p.name for p in main.commands["plan"].params}
    cli_only = {"config_path", "out", "quiet", "verbose", "help", "cuda", "gpu_rich", "transformers_cache",
                "write_model_card", "unsafe_truncate_embeddings"}  # the last two: write_card, truncate_vocab
    assert run_params - cli_only <= fields, run_params - cli_only - fields
    assert run_params - {"out", "quiet"} <= plan_params
    cfg = tmp_path / "m.yml"
    cfg.write_text(ties_config(tiny_set))
    r = CliRunner().invoke(main, ["plan", str(cfg), "--device", "cpu", "--unsafe-truncate-embeddings",
                                  "--no-copy-tokenizer", "--out-shard-size", "60K", "--max-memory", "16GiB"])
    assert r.exit_code == 0, r.output
    assert "shard(s)" in r.output and "model-00001-of-" in r.output


# --- costs and checks are declared, not asked of a kernel --------------------------------------

def test_method_checks_and_costs_need_no_kernel() -> None:
    from helpers import context
    from hypothesis import given, settings
    from hypothesis import strategies as st

    flat3d = context("nuslerp", [{"weight": 1}, {"weight": 1}], {"nuslerp_flatten": False}, shape=(2, 3, 4))
    assert any("not supported yet" in p for p in METHODS["nuslerp"].check(flat3d))
    assert METHODS["nuslerp"].check(context("nuslerp", [{"weight": 1}, {"weight": 1}], {}, shape=(2, 3, 4))) == []

    @settings(max_examples=60, deadline=None)
    @given(method=st.sampled_from(["ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "task_arithmetic"]),
           densities=st.lists(st.sampled_from([0.0, 0.3, 0.6, 1.0]), min_size=1, max_size=3),
           rescale=st.booleans(), rows=st.integers(1, 6))
    def declared_matches_kernel(method: str, densities: list[float], rescale: bool, rows: int) -> None:
        per = [{}] + [{"weight": 0.5, "density": d, "gamma": 0.1, "epsilon": min(d, 1 - d) / 2 or 0.1}
                      for d in densities]
        ctx = context(method, per, {"rescale": rescale}, base=0, shape=(rows, 8))
        cost = METHODS[method].cost(ctx)
        op = METHODS[method].make(ctx)
        kernel_passes = max([sp.stat_passes for sp in op.sparsifiers] + [0])  # type: ignore[attr-defined]
        assert cost.stat_passes == kernel_passes
        op.hold_state()
        held = sum(1 for sp in op.sparsifiers if getattr(sp, "remember", False))  # type: ignore[attr-defined]
        assert cost.held_per_element == held / 8

    declared_matches_kernel()


def test_mergekit_negative_flags_are_accepted(tiny_set, tmp_path) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(ties_config(tiny_set))
    flags = ["--no-cuda", "--no-lazy-unpickle", "--no-allow-crimes", "--no-copy-tokenizer", "--no-low-cpu-memory",
             "--no-trust-remote-code", "--no-clone-tensors", "--no-read-to-gpu", "--no-multi-gpu", "--no-async-write",
             "--no-write-model-card", "--no-safe-serialization", "--no-gpu-rich", "--no-quiet"]
    r = CliRunner().invoke(main, [str(cfg), str(tmp_path / "o"), *flags])
    assert r.exit_code == 0, r.output
    assert "tokenizer.json" not in os.listdir(tmp_path / "o")  # --no-copy-tokenizer did what it says
    assert "--allow-crimes: not needed" not in r.output  # a --no- flag asks for nothing to be explained

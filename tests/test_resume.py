"""Kill it anywhere, run it again: real SIGKILLs at 36 points spread over a merge (tensor
writes, journal appends, shard syncs, every finalisation step, index writing), each resumed —
also with another --max-memory — ends with a folder byte-identical to an uninterrupted run.
Also: the rules for a changed config, the run lock, and an up-to-date or finished output."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import assert_golden
from kill_test import snapshot  # one byte-for-byte folder snapshot, shared with the kill tool
from launch import streammerge

from streammerge.journal import RunLock


def config(tmp_path, folders: list[str], weight: str = "0.5", out_dtype: str | None = None) -> str:
    lines = ["merge_method: dare_ties", f"base_model: {folders[0]}", "models:", f"  - model: {folders[0]}"]
    for f in folders[1:]:
        lines += [f"  - model: {f}", f"    parameters: {{weight: {weight}, density: 0.6}}"]
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    path = tmp_path / f"cfg-{abs(hash((weight, out_dtype)))}.yml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(cfg: str, out: str, *extra: str, crash_at: int | None = None, trace: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMMERGE_CRASH")}
    if crash_at is not None:
        env["STREAMMERGE_CRASH_AT"] = str(crash_at)
    if trace:
        env["STREAMMERGE_CRASH_TRACE"] = trace
    return streammerge("run", cfg, out, "--out-shard-size", "60K", *extra, env=env)


def smallest_budget(cfg: str) -> int:
    """The smallest feasible --max-memory on this machine, in MiB (baselines differ between machines)."""
    r = streammerge("plan", cfg, "--json")
    return json.loads(r.stdout)["smallest_max_memory_bytes"] // 2**20 + 1


def looks_complete(out: str) -> bool:
    """What a user or transformers would take for a finished model folder."""
    return os.path.isfile(os.path.join(out, "model.safetensors.index.json"))


@pytest.fixture(scope="module")
def reference(tiny_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    cfg = config(root, tiny_set)
    out = str(root / "out")
    trace = str(root / "trace.txt")
    r = run(cfg, out, trace=trace)
    assert r.returncode == 0, r.stderr
    assert_golden("resume/dare_ties", out)
    with open(trace) as f:
        points = [line.split()[1] for line in f]
    return cfg, snapshot(out), points


def kill_points(points: list[str], n: int = 36) -> list[int]:
    """Every finalisation point, each kind of point mid-run, the rest spread evenly (1-based)."""
    final = {"tasks-done", "card-written", "manifest-written", "shard-renamed", "index-written", "finished"}
    chosen = {i + 1 for i, p in enumerate(points) if p in final}
    middle = len(points) // 2
    for kind in set(points) - final:
        chosen.add(next(i + 1 for i, p in enumerate(points) if p == kind and i >= middle))
    rest = [i + 1 for i, p in enumerate(points) if i + 1 not in chosen]
    step = max(1, len(rest) // max(1, n - len(chosen)))
    chosen |= set(rest[::step][: max(0, n - len(chosen))])
    return sorted(chosen)


def test_sigkill_anywhere_then_resume_gives_identical_bytes(reference, tmp_path) -> None:
    cfg, want, points = reference
    assert len(points) > 100 and len(set(points)) >= 10
    at = kill_points(points)
    assert len(at) >= 36
    tight = f"{smallest_budget(cfg) + 8}MiB"  # resumed runs alternate: default budget, near-minimal chunks

    def kill_then_resume(k: int, n: int) -> str:
        out = str(tmp_path / f"k{n}" / "out")  # the card's title is the folder name
        killed = run(cfg, out, crash_at=n)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if looks_complete(out):  # a folder that looks complete must be complete
            assert snapshot(out) == want, f"looked complete after a kill at {points[n - 1]} but differs"
        budget = ["--max-memory", tight] if k % 2 else []
        resumed = run(cfg, out, *budget)
        assert resumed.returncode == 0, resumed.stderr
        if k == 0:
            assert_golden("resume/dare_ties", out)
        assert snapshot(out) == want, f"kill at point {n} ({points[n - 1]}) changed the output"
        return points[n - 1]

    # two kill-and-resume sequences at a time, each in its own folder
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(kill_then_resume, range(len(at)), at))
    assert {"journal-append", "chunk-written", "manifest-written", "shard-renamed", "index-written"} <= set(outcomes)


def test_killed_again_and_again(reference, tmp_path) -> None:
    cfg, want, points = reference
    out = str(tmp_path / "o" / "out")
    for n in (7, 30, 25, len(points) // 2):  # each resumed run is itself killed, counting from its start
        r = run(cfg, out, crash_at=n)
        assert r.returncode == -signal.SIGKILL
    r = run(cfg, out)
    assert r.returncode == 0 and "resuming an interrupted run" in r.stderr
    assert snapshot(out) == want


def test_changed_parameters_keep_unchanged_tensors(tiny_set, tmp_path) -> None:
    a = config(tmp_path, tiny_set, weight="0.5")
    b = config(tmp_path, tiny_set, weight="[{filter: mlp, value: 0.7}, {value: 0.5}]")
    clean = str(tmp_path / "clean" / "out")
    assert run(b, clean).returncode == 0
    out = str(tmp_path / "o" / "out")
    assert run(a, out, crash_at=60).returncode == -signal.SIGKILL
    r = run(b, out)
    assert r.returncode == 0, r.stderr
    assert "changed since and recomputed" in r.stderr
    assert snapshot(out) == snapshot(clean)


def test_changed_layout_needs_restart(tiny_set, tmp_path) -> None:
    a, b = config(tmp_path, tiny_set), config(tmp_path, tiny_set, out_dtype="float32")
    out = str(tmp_path / "o" / "out")
    assert run(a, out, crash_at=40).returncode == -signal.SIGKILL
    r = run(b, out)
    assert r.returncode == 6 and "output layout differs" in r.stderr and "--restart" in r.stderr
    r = run(b, out, "--restart")
    assert r.returncode == 0, r.stderr
    clean = str(tmp_path / "clean" / "out")
    assert run(b, clean).returncode == 0
    assert snapshot(out) == snapshot(clean)


def test_finished_output_up_to_date_or_refused(reference, tiny_set, tmp_path) -> None:
    cfg, want, _ = reference
    out = str(tmp_path / "o" / "out")
    assert run(cfg, out).returncode == 0
    r = run(cfg, out)
    assert r.returncode == 0 and "already holds this exact merge" in r.stderr
    other = config(tmp_path, tiny_set, weight="0.25")
    r = run(other, out)
    assert r.returncode == 6 and "--overwrite" in r.stderr
    assert snapshot(out) == want


def test_a_second_run_fails_fast_and_a_stale_lock_is_ignored(reference, tmp_path) -> None:
    cfg, want, _ = reference
    out = str(tmp_path / "o" / "out")
    os.makedirs(out)
    lock = RunLock(out)  # as a live run holds it
    r = run(cfg, out)
    assert r.returncode == 6 and f"another streammerge run (pid {os.getpid()})" in r.stderr
    lock.release()  # what the kernel does when the holder dies; the pid stays in the file
    r = run(cfg, out)
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == want


def test_group_commit_syncs_once_per_shard_and_journals_after(reference, tiny_set, tmp_path) -> None:
    """Tensors are synced and journaled in groups (here: per 60K shard), a shard's data sync always
    before the journal lines it covers."""
    cfg, _, points = reference
    tensors = len(make_plan_for(cfg).tasks)
    shards = points.count("shard-synced")
    assert points.count("tensor-synced") == points.count("journal-append") == points.count("journal-synced")
    assert shards <= points.count("tensor-synced") <= shards + 1 < tensors
    for i, p in enumerate(points):
        if p == "journal-append":
            assert points[i - 1] == "tensor-synced"


def make_plan_for(cfg: str):
    from streammerge.planner import make_plan, parse

    with open(cfg) as f:
        return make_plan(parse(f.read())[0], 60_000)

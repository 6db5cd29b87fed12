"""A group's fdatasync runs on a thread of its own while the merge goes on, and the group's
journal lines are appended only after it returned: every tensor a line covers ended before the
sync that covers it began. Also: a sync that fails stops the run with the disk's error, and an
error elsewhere waits for a sync in flight before the shard's file is closed."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from helpers import ROOMY

import streammerge.committer as committer_mod
from streammerge.config import parse_config
from streammerge.errors import OutputError
from streammerge.executor import Executor
from streammerge.journal import Journal
from streammerge.options import RunOptions
from streammerge.planner import make_plan
from streammerge.writer import ShardWriter


def linear_plan(folders: list[str]):
    lines = ["merge_method: linear", "models:"]
    lines += [f"  - {{model: {f}, parameters: {{weight: {w}}}}}" for f, w in zip(folders, (0.4, 0.3, 0.2, 0.1))]
    return make_plan(parse_config("\n".join(lines) + "\n"), 200_000)


def merge(plan, out: str, threads: int = 1, overlap: bool = False) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Executor(plan, out, RunOptions(max_memory=ROOMY, overlap=overlap)).run()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def events(monkeypatch):
    """Every sync's start and end, every ended tensor and every journal append, with its thread."""
    log: list[tuple[str, object, int]] = []
    lock = threading.Lock()

    def note(kind: str, what: object) -> None:
        with lock:
            log.append((kind, what, threading.get_ident()))

    sync, end_task, append = ShardWriter.sync, committer_mod.Committer.end_task, Journal.append

    def slow_sync(self) -> None:
        note("sync-start", self.path)
        time.sleep(0.05)  # a slow disk: the merge must go on meanwhile
        sync(self)
        note("sync-end", self.path)

    def noted_end_task(self, task, *args, **kwargs) -> None:
        note("ended", task.name)
        end_task(self, task, *args, **kwargs)

    def noted_append(self, *entries) -> None:
        note("append", [e.name for e in entries])
        append(self, *entries)

    monkeypatch.setattr(ShardWriter, "sync", slow_sync)
    monkeypatch.setattr(committer_mod.Committer, "end_task", noted_end_task)
    monkeypatch.setattr(Journal, "append", noted_append)
    monkeypatch.setattr(committer_mod, "GROUP_COMMIT_BYTES", 30_000)  # many groups per shard
    return log


@pytest.mark.parametrize(("threads", "overlap"), [(1, False), (2, False), (2, True)])
def test_lines_follow_the_sync_that_covers_them(tiny_set, tmp_path, events, threads, overlap) -> None:
    plan = linear_plan(tiny_set)
    merge(plan, str(tmp_path / "out"), threads, overlap)
    appends = [i for i, e in enumerate(events) if e[0] == "append"]
    assert len(appends) > len(plan.shards)  # several groups per shard
    journaled = [n for i in appends for n in events[i][1]]
    assert sorted(journaled) == sorted(t.name for t in plan.tasks)
    behind = overlapped = 0
    for i in appends:
        start = max(j for j in range(i) if events[j][0] == "sync-start")
        assert any(events[j][0] == "sync-end" and events[j][1] == events[start][1] for j in range(start, i))
        ended_before = {events[j][1] for j in range(start) if events[j][0] == "ended"}
        assert set(events[i][1]) <= ended_before  # its bytes were written before that sync began
        if events[start][2] != events[i][2]:
            behind += 1
            # the merge went on while it synced: tensors ended between the sync's start and its end
            end = next(j for j in range(start, i) if events[j][0] == "sync-end")
            overlapped += any(events[j][0] == "ended" for j in range(start, end))
    assert behind >= len(appends) - len(plan.shards)  # every group but a shard's last syncs behind
    # all of them while the merge went on, but one filled just before its shard's end
    assert overlapped >= behind - len(plan.shards) > 0


def test_a_failed_sync_stops_the_run_with_the_disks_error(tiny_set, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(committer_mod, "GROUP_COMMIT_BYTES", 30_000)
    calls = []

    def failing(fd: int) -> None:
        calls.append(threading.get_ident())
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"model-00001-of-\d+\.safetensors\.partial: cannot write \(Input/output"):
        merge(linear_plan(tiny_set), str(out))
    assert calls and calls[0] != threading.get_ident()  # it failed behind, and was raised here
    assert not (out / "model.safetensors.index.json").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".safetensors")]  # nothing looks finished


def test_an_error_elsewhere_waits_for_the_sync_in_flight(tiny_set, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(committer_mod, "GROUP_COMMIT_BYTES", 30_000)
    sync, close = ShardWriter.sync, ShardWriter.close
    state = {"syncing": 0, "closed_while_syncing": 0, "writes": 0}

    def slow_sync(self) -> None:
        state["syncing"] += 1
        time.sleep(0.2)
        sync(self)
        state["syncing"] -= 1

    def watched_close(self) -> None:
        state["closed_while_syncing"] += state["syncing"]
        close(self)

    write = committer_mod.Committer.write

    def failing_write(self, *args, **kwargs) -> None:
        state["writes"] += 1
        if self._syncing is not None:
            raise KeyboardInterrupt  # Ctrl-C while a group syncs
        write(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "sync", slow_sync)
    monkeypatch.setattr(ShardWriter, "close", watched_close)
    monkeypatch.setattr(committer_mod.Committer, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        merge(linear_plan(tiny_set), str(tmp_path / "out"))
    assert state["writes"] > 1 and state["closed_while_syncing"] == 0

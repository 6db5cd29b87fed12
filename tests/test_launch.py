"""The tests' child launcher (tests/launch.py) when multiprocessing's forkserver loses a child's
wait status: Process.exitcode then reads 255, and the launcher takes the child's own word, or, with
none, a kill. Both branches run real children; the lost status is simulated by making the code
the forkserver reports the one the launcher treats as lost."""

from __future__ import annotations

import os
import signal

import launch
import pytest


def test_a_lost_status_is_the_status_the_child_wrote(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(launch, "_LOST", 3)  # what a missing config exits with, reported as "lost"
    r = launch.streammerge("plan", str(tmp_path / "missing.yml"))
    assert r.returncode == 3 and "cannot read the config file" in r.stderr


@pytest.mark.parametrize("lost", [-signal.SIGKILL, 0])
def test_a_lost_status_without_the_childs_word_is_a_kill(tiny_set, tmp_path, monkeypatch, lost) -> None:
    """A child SIGKILLed at a crash point writes nothing; one that exits says so (0 here)."""
    monkeypatch.setattr(launch, "_LOST", lost)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - {{model: {tiny_set[0]}, parameters: {{weight: 1.0}}}}\n")
    env = None if lost == 0 else {**os.environ, "STREAMMERGE_CRASH_AT": "3"}
    r = launch.streammerge("run", str(cfg), str(tmp_path / "out"), "-q", env=env)
    assert r.returncode == lost, r.stderr

"""The cores a run may use: affinity capped by a cgroup CPU quota (v2 cpu.max, v1 cfs files)."""

from __future__ import annotations

import os

from streammerge.executor import cgroup_cpus


def test_cgroup_quota_v2_v1_and_none(tmp_path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box\n")
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(str(tmp_path), str(proc)) == 2  # 1.5 CPUs, rounded up
    (tmp_path / "box" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(str(tmp_path), str(proc)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(str(v1), str(tmp_path / "missing")) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(str(v1), str(tmp_path / "missing")) is None
    assert cgroup_cpus(str(tmp_path / "nothing"), str(tmp_path / "missing")) is None



def test_default_threads_leave_room_for_what_else_runs() -> None:
    from streammerge.executor import default_threads, idle_cpus

    assert default_threads(2, 1.9, 2) == 2  # quiet: every core
    assert default_threads(2, 0.1, 2) == 1  # loaded: one thread, never none
    assert default_threads(2, 1.4, 2) == 1  # one core busy elsewhere
    assert default_threads(16, 10.2, 16) == 10
    assert default_threads(16, 16.0, 8) == 8  # never more than torch's own count
    assert default_threads(4, 16.0, 16) == 4  # never more than the cores available (a cgroup quota)
    idle = idle_cpus(0.05)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1)

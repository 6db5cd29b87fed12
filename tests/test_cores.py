"""The cores a run may use: affinity capped by a cgroup CPU quota (v2 cpu.max, v1 cfs files)."""

from __future__ import annotations

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



def test_default_threads_are_the_cores_this_process_may_use() -> None:
    from streammerge.executor import default_threads

    assert default_threads(2, 2) == 2
    assert default_threads(16, 8) == 8  # never more than torch's own count (physical cores)
    assert default_threads(4, 16) == 4  # never more than the cores available (a cgroup quota)
    assert default_threads(0, 4) == 1  # never none


def test_a_quarter_of_the_cores_read_ahead() -> None:
    """With a read-ahead (4 cores or more), blocks are read by a quarter of the cores' threads:
    reading was about a quarter of the 15-model DARE-TIES's CPU (tools/thread_cpu.py)."""
    from streammerge.executor import OVERLAP_MIN_CORES, read_threads

    assert [read_threads(c) for c in (1, 2, OVERLAP_MIN_CORES, 7, 8, 16, 32, 64, 256)] == [1, 1, 1, 1, 2, 4, 8, 8, 8]

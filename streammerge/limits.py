"""What this process may use: the CPUs and memory its cgroups allow, read from /sys/fs/cgroup.

Imports psutil only. The executor sizes threads and budgets from these, the compiled loops'
helper (methods.fused) remembers under which memory limit it could not compile.
"""

from __future__ import annotations

import math
import os

import psutil


def _own_cgroups(proc_cgroup: str, controller: str) -> tuple[str, str]:
    """This process's cgroup path in the unified (v2) hierarchy and in v1's `controller` hierarchy
    ("" where it has none)."""
    unified, v1 = "", ""
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) != 3:
                    continue
                if parts[0] == "0" and parts[1] == "":
                    unified = parts[2]
                elif controller in parts[1].split(","):
                    v1 = parts[2]
    except OSError:
        pass
    return unified, v1


def cgroup_cpus(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """CPUs the process's cgroups let it use: the smallest quota over its period (rounded up) of its
    own cgroup and every one above it, or None when none has a quota. cgroup v2's cpu.max, else
    v1's cpu.cfs_quota_us and cpu.cfs_period_us in the cpu controller's hierarchy; a cgroup whose
    folder this mount does not show (a container sees its own cgroup as the root) is skipped.
    (Reading only the root's files missed a quota set below it: a v1 job cgroup of half a CPU
    on this 2-core machine still counted 2.)"""
    unified, v1 = _own_cgroups(proc_cgroup, "cpu")
    seen, limits = False, []
    for folder in _up(root, unified):
        try:
            with open(os.path.join(folder, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            seen = True
            if quota != "max" and int(period) > 0:
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if not seen else ():
        for folder in _up(os.path.join(root, mount), v1):
            try:
                with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
                    quota_us = int(f.read())
                with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
                    period_us = int(f.read())
            except (OSError, ValueError):
                continue
            if quota_us > 0 and period_us > 0:
                limits.append(quota_us / period_us)
    return max(1, math.ceil(min(limits))) if limits else None


# cgroup v1 writes "no limit" as the largest page-aligned count; anything this large is none
_V1_UNLIMITED = 1 << 62


def cgroup_memory(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes of memory the process's cgroups let it use, page cache included: the smallest limit of
    its own cgroup and every one above it (v2's memory.max, else v1's memory.limit_in_bytes in the
    memory controller's hierarchy), or None where none sets one."""
    unified, v1 = _own_cgroups(proc_cgroup, "memory")
    limits = []
    for folder in _up(root, unified):
        try:
            with open(os.path.join(folder, "memory.max")) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    if not limits:
        for folder in _up(os.path.join(root, "memory"), v1):
            try:
                with open(os.path.join(folder, "memory.limit_in_bytes")) as f:
                    limit = int(f.read())
            except (OSError, ValueError):
                continue
            if 0 < limit < _V1_UNLIMITED:
                limits.append(limit)
    return min(limits) if limits else None


def memory_limit() -> int:
    """Bytes of memory this process may use: its memory cgroup's limit, else the machine's memory."""
    return cgroup_memory() or int(psutil.virtual_memory().total)


def _up(base: str, path: str) -> list[str]:
    """The folder of cgroup `path` under `base`, then each folder above it, up to `base` itself."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [os.path.join(base, *parts[:k]) for k in range(len(parts), -1, -1)]

#!/usr/bin/env python3
"""CPU seconds per thread role of one streammerge run: where a merge would stop scaling.

Runs `streammerge run ...` in this process and samples every thread's CPU time (Linux
/proc/self/task) every 50 ms, then prints the total per role: the main thread (imports, planning,
the runner's Python, finalising), the compute threads (streammerge-kernel), the read-ahead thread
(streammerge-read) and the threads it reads each block on (streammerge-reader), the write-behind
and sync threads. On N cores a merge cannot take less than its busiest single thread's time, nor
less than the compute threads' total over N. Where the kernel keeps scheduler statistics
(/proc/.../schedstat) the times are to the nanosecond, and each role's time spent runnable but
waiting for a core is printed too: threads that wait long there have more of their own, or other
programs, sharing their cores (the 3-model linear merge on 2 cores: the computing thread 0.10 s
of its 0.8, the reader and the writer 0.13-0.36 s each).

  python tools/thread_cpu.py [--compute-threads N] [--read-threads N] -- run CONFIG OUT [options]

--compute-threads and --read-threads set those counts whatever the cores (to measure on a small
machine how the work would divide on a large one; the run is then oversubscribed, so its wall time
says nothing). Measured this way on 2 cores (medium set, 15-model DARE-TIES, 512 MiB cgroup and
budget, --overlap, 4 compute threads, two runs each): compute 9.5-10.3 s; the read-ahead thread
3.1-3.2 s reading alone, or 0.9-1.0 s beside 3 reading threads that took 3.1-3.3 s between them;
the main thread 2.4-2.7 s, about 1.5 s of it imports. So on 16 cores (15 computing: 0.7 s each,
4 reading: 0.8 s each) no thread would be busy for more than about a second of the merge, where
one reading thread would have been for 3.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def thread_times(tid: int) -> tuple[float, float | None] | None:
    """Thread `tid`'s CPU seconds and seconds spent waiting on a run queue (schedstat; None where
    the kernel keeps no such file: the CPU time then comes from stat, in clock ticks), or None once
    it has ended."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, None


def role(name: str) -> str:
    """A thread's role from its Python name: 'streammerge-kernel_3' -> 'streammerge-kernel'; a
    thread Python did not start by its kernel name ('native python3': the interpreter's own name, as
    OpenMP's workers have; 'native cuda-EvtHandlr')."""
    if name == "MainThread" or name.startswith("native "):
        return name
    return name.rstrip("0123456789").rstrip("_-")


def native_name(tid: int) -> str:
    """'native ' and the kernel's name of thread `tid` (/proc/.../comm)."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return "native " + f.read().strip()
    except OSError:
        return "native ?"


class Sampler:
    """Every thread's latest CPU time and Python name, sampled on a thread of its own; a Python
    thread's as it ends, too (threading.Thread.run wrapped while the sampler runs): a thread that
    lived between two samples was missed (a merge of 0.28 s lost its read-ahead thread), and one
    that ended was counted as of the sample before."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.seen: dict[int, tuple[str, float, float | None]] = {}  # tid: name, CPU s, run-queue wait s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._lock = threading.Lock()
        self._real_run = threading.Thread.run

    def __enter__(self) -> Sampler:
        real, sampler = self._real_run, self

        def run(thread: threading.Thread) -> None:
            try:
                real(thread)
            finally:
                sampler.ended(thread)

        threading.Thread.run = run  # type: ignore[method-assign, assignment]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.Thread.run = self._real_run  # type: ignore[method-assign]
        self._stop.set()
        self._thread.join()
        self._sample()

    def ended(self, thread: threading.Thread) -> None:
        """On a Python thread about to end: its final times."""
        tid = thread.native_id
        times = thread_times(tid) if tid is not None else None
        if tid is not None and times is not None:
            with self._lock:
                self.seen[tid] = (thread.name, *times)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for entry in os.listdir("/proc/self/task"):
            tid = int(entry)
            times = thread_times(tid)
            if times is not None:
                with self._lock:
                    name = names.get(tid) or (self.seen[tid][0] if tid in self.seen else native_name(tid))
                    if times[0] >= self.seen.get(tid, ("", 0.0, None))[1]:  # (never back past a thread's end)
                        self.seen[tid] = (name, *times)

    def table(self) -> list[tuple[str, int, float, float | None]]:
        """(role, threads, CPU seconds, seconds waiting on a run queue or None), busiest role first."""
        total: dict[str, float] = collections.defaultdict(float)
        waits: dict[str, float | None] = {}
        count: collections.Counter[str] = collections.Counter()
        for name, cpu, wait in self.seen.values():
            r = role(name)
            total[r] += cpu
            count[r] += 1
            before = waits.get(r, 0.0)
            waits[r] = None if wait is None or before is None else before + wait
        return sorted(((r, count[r], s, waits[r]) for r, s in total.items()), key=lambda row: -row[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compute-threads", type=int, help="compute threads, whatever the cores")
    ap.add_argument("--read-threads", type=int, help="threads reading each block ahead, whatever the cores")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then streammerge's arguments (run CONFIG OUT ...)")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not os.path.isdir("/proc/self/task"):
        raise SystemExit("thread_cpu.py reads /proc/self/task: Linux only")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import click

    import streammerge.executor as executor
    from streammerge.cli import main as cli

    if a.compute_threads:
        executor.Executor._threads = lambda self: a.compute_threads  # type: ignore[method-assign]
    if a.read_threads:
        executor.read_threads = lambda cores: a.read_threads  # type: ignore[assignment]
    began = time.monotonic()
    with Sampler() as sampler:
        try:
            code = cli(args, standalone_mode=False)
        except click.ClickException as e:  # a usage error, said as streammerge says it
            e.show()
            raise SystemExit(e.exit_code) from None
        if isinstance(code, int):  # click's exit without a run: --help, --version
            raise SystemExit(code)
        wall = time.monotonic() - began
    rows = sampler.table()
    total = sum(s for _, _, s, _ in rows)
    print(f"wall {wall:.2f} s, CPU {total:.2f} s")
    for name, n, s, wait in rows:
        waited = f"  waited for a core {wait:7.2f} s" if wait is not None else ""
        print(f"  {name:24s} {n:3d} thread(s) {s:7.2f} s  {100 * s / max(total, 1e-9):5.1f}%{waited}")


if __name__ == "__main__":
    main()

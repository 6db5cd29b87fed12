#!/usr/bin/env python3
"""Seconds that Python's lock (the GIL) was held during one streammerge run, and where: the part of a
merge its compute threads cannot share, whatever the cores.

Runs `python -m streammerge ARGS` under py-spy (`record --gil`: samples only the thread that holds
the lock) and prints the held seconds spent importing and merging, by thread, and by the innermost
streammerge function (or the innermost frame where none is streammerge's). Needs py-spy (`pip
install py-spy`; --py-spy PATH for one elsewhere). Measured on 2 cores (medium set, 14-model
DARE-TIES, 1 GiB): held 1.15 s of the merge at -j 1 and 1.94 s at -j 2, 6.6M Python floats of row
sums the largest part, then 0.88 and 1.63 s once those were summed in a compiled loop.

  python tools/gil_profile.py [--rate 200] [--top 25] -- run CONFIG OUT [options]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import sigterm_exits  # noqa: E402


def held(raw: str, rate: float) -> tuple[collections.Counter[str], collections.Counter[str], collections.Counter[str]]:
    """(seconds by phase: import/merge, by thread, by function) from py-spy's raw (collapsed) output."""
    phase: collections.Counter[str] = collections.Counter()
    thread: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        s = int(count) / rate
        frames = stack.split(";")
        thread[frames[0].split(" (")[0]] += s
        if any("_find_and_load" in f for f in frames):
            phase["import"] += s
            continue
        phase["merge"] += s
        ours = [f for f in frames if "streammerge/" in f]
        name = re.sub(r":\d+\)$", ")", ours[-1] if ours else frames[-1])
        where[re.sub(r"\(/.*?/(streammerge/)", r"(\1", name)] += s
    return phase, thread, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=200, help="samples a second (a whole number: py-spy takes no other)")
    ap.add_argument("--top", type=int, default=25, help="functions listed")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy's path")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then streammerge's arguments (run CONFIG OUT ...)")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not a.py_spy or not os.path.exists(a.py_spy):
        raise SystemExit("gil_profile.py needs py-spy: pip install py-spy, or give --py-spy PATH")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "gil.txt")
        cmd = [a.py_spy, "record", "--gil", "--rate", str(a.rate), "--format", "raw", "-o", raw, "--",
               sys.executable, "-m", "streammerge", *args]
        p = subprocess.run(cmd, capture_output=True, text=True)
        print("\n".join(ln for ln in (p.stdout + p.stderr).splitlines() if not ln.startswith("py-spy>")))
        if p.returncode != 0 or not os.path.exists(raw):
            raise SystemExit(f"the run or py-spy failed (rc {p.returncode})")
        with open(raw) as f:
            phase, thread, where = held(f.read(), a.rate)
    print(f"Python's lock held: {phase['merge']:.2f} s merging, {phase['import']:.2f} s importing")
    for name, s in thread.most_common(4):
        print(f"  thread {name:<40} {s:7.2f} s")
    for name, s in where.most_common(a.top):
        print(f"  {s:7.3f} s  {name}")


if __name__ == "__main__":
    with sigterm_exits():  # a timeout's SIGTERM still removes the temporary folders
        main()

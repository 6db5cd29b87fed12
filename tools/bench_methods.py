#!/usr/bin/env python3
"""Every merge method on the medium set at one budget: passes over the inputs, wall time, peak RSS.

Uses the recipes of tests/test_all_methods.py on the medium set's first four models (base +
three fine-tunes, 567 MB each) and prints one row per method.

  python tools/bench_methods.py --dir /work/bench/medium [--max-memory 1GiB]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from bench_common import ensure_medium_set, measure  # noqa: E402
from test_all_methods import RECIPES, config_text  # noqa: E402

from streammerge.config import parse_config  # noqa: E402
from streammerge.methods import METHODS  # noqa: E402
from streammerge.planner import make_plan  # noqa: E402


def passes(cfg_text: str) -> str:
    """The distinct numbers of statistics passes + 1 (apply) over the plan's tasks."""
    plan = make_plan(parse_config(cfg_text))
    counts = sorted({t.cost.stat_passes + 1 for t in plan.tasks})
    return "/".join(str(c) for c in counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench/medium")
    ap.add_argument("--max-memory", default="1GiB")
    a = ap.parse_args()
    root = os.path.abspath(a.dir)
    folders = ensure_medium_set(root)[:4]
    rows = []
    for method in sorted(METHODS):
        text = config_text(method, folders)
        cfg = os.path.join(root, f"method-{method}.yml")
        with open(cfg, "w") as f:
            f.write(text)
        out = os.path.join(root, "out-method")
        shutil.rmtree(out, ignore_errors=True)
        m = measure([sys.executable, "-m", "streammerge", "run", cfg, out, "-q", "--max-memory", a.max_memory])
        rss = re.search(r"peak RSS (\d+) MiB", m.stderr)
        rows.append((method, passes(text), RECIPES[method][0].count("|") + 1, m.wall_s,
                     int(rss.group(1)) if rss else None, m.rc))
        print(f"{method}: {m.wall_s:.1f} s", flush=True)
    print(f"\nmedium set, {os.cpu_count()} cores, --max-memory {a.max_memory}")
    print(f"{'method':<18} {'inputs':>6} {'passes':>7} {'wall s':>7} {'peak RSS MiB':>12}")
    for method, p, n, wall, rss, rc in rows:
        print(f"{method:<18} {n:>6} {p:>7} {wall:>7.1f} {str(rss):>12}" + ("" if rc == 0 else "  FAILED"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Memory benchmark: the 14-model DARE-TIES on the medium set under hard memory caps.

Makes the medium set if missing (15 Mistral-shaped models: hidden 1024, intermediate 3584,
16 layers, 32 heads, 8 KV heads, vocab 32000, ~560 MB each in bf16), then runs the seed's
stage-1 recipe on it unbounded and under tools/memcap at each cap with --max-memory equal to
the cap, and prints wall time, peak RSS, the cgroup's peak usage (page cache included) and
whether every per-tensor hash equals the unbounded run's.

  python tools/bench_memory.py --dir /work/bench/medium [--caps 2G,1G,512M]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import dare_ties_14, ensure_medium_set, measure, shard_files, tensor_hashes, warm  # noqa: E402

MEMCAP = os.path.join(HERE, "memcap")


def write_config(root: str, folders: list[str]) -> str:
    path = os.path.join(root, "dare_ties_14.yml")
    with open(path, "w") as fh:
        fh.write(dare_ties_14(folders))
    return path


def run(cfg: str, out: str, cap: str | None) -> dict[str, object]:
    cmd = [sys.executable, "-m", "streammerge", "run", cfg, out, "-q", "--overwrite"]
    if cap:
        cmd = ["bash", MEMCAP, cap, "--", *cmd, "--max-memory", cap + "iB"]
    m = measure(cmd)
    rss = re.search(r"peak RSS (\d+) MiB", m.stderr)
    cg = re.search(r"max_usage=(\d+)", m.stderr)
    res: dict[str, object] = {"cap": cap or "none", "rc": m.rc, "wall_s": round(m.wall_s, 1),
                              "peak_rss_mib": int(rss.group(1)) if rss else None,
                              "cgroup_peak_mib": int(cg.group(1)) // 2**20 if cg else None}
    if m.rc != 0:
        res["error"] = m.stderr.strip().splitlines()[-3:]
    else:
        res["hashes"] = tensor_hashes(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench/medium")
    ap.add_argument("--caps", default="2G,1G,512M")
    a = ap.parse_args()
    root = os.path.abspath(a.dir)
    folders = ensure_medium_set(root)
    cfg = write_config(root, folders)
    warm([p for f in folders for p in shard_files(f)])
    results = [run(cfg, os.path.join(root, "out-unbounded"), None)]
    for cap in a.caps.split(","):
        results.append(run(cfg, os.path.join(root, f"out-{cap}"), cap))
    ref = results[0].get("hashes")
    print(f"\n14-model DARE-TIES, medium set ({len(folders)} models), {os.cpu_count()} cores")
    print(f"{'cap':>6} {'rc':>4} {'wall s':>8} {'peak RSS MiB':>13} {'cgroup peak MiB':>16}  hashes equal")
    for r in results:
        same = "-" if r.get("hashes") is None else ("yes" if r["hashes"] == ref else "NO")
        print(f"{r['cap']:>6} {r['rc']:>4} {r['wall_s']:>8} {str(r['peak_rss_mib']):>13} "
              f"{str(r['cgroup_peak_mib']):>16}  {same}")
        if "error" in r:
            print("       " + " / ".join(r["error"]))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

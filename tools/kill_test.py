#!/usr/bin/env python3
"""Kill testing at scale: random real SIGKILLs across budgets and shard sizes, each resumed (and
sometimes killed again during the resume) to the end, compared byte for byte with an
uninterrupted run of the same command.

  python tools/kill_test.py --kills 200 [--dir killtest] [--seed 0]

Each trial picks a shard size and a --max-memory (from the plan's smallest feasible budget up),
runs the 4-model DARE-TIES on tiny generated models with STREAMMERGE_CRASH_AT set to a random
crash point of that configuration's trace (tensor writes, syncs, journal appends, every
finalisation step), then reruns the same command, killing it again with probability 1/3, until it
exits 0. Prints one line per trial and the totals: kills tried, outputs identical, outputs that
differed, runs that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_models  # noqa: E402

SHARD_SIZES = ["40K", "60K", "200K", "5B"]


def run(cfg: str, out: str, shard: str, budget: str, crash_at: int | None = None,
        trace: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMMERGE_CRASH")}
    if crash_at is not None:
        env["STREAMMERGE_CRASH_AT"] = str(crash_at)
    if trace:
        env["STREAMMERGE_CRASH_TRACE"] = trace
    cmd = [sys.executable, "-m", "streammerge", "run", cfg, out, "--out-shard-size", shard, "--max-memory", budget,
           "-q"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def snapshot(out: str) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200, help="trials (each starts with one kill)")
    ap.add_argument("--dir", default="killtest")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    root = os.path.abspath(a.dir)
    folders = [os.path.join(root, "models", n) for n in ("base", "ft1", "ft2", "ft3")]
    if not os.path.isdir(folders[-1]):
        make_models.write_set(folders, make_models.PRESETS["tiny"], seed=1, shard_bytes=120_000)
    cfg = os.path.join(root, "dare.yml")
    with open(cfg, "w") as f:
        f.write(f"merge_method: dare_ties\nbase_model: {folders[0]}\nmodels:\n  - model: {folders[0]}\n"
                + "".join(f"  - model: {m}\n    parameters: {{weight: 0.4, density: 0.6}}\n" for m in folders[1:]))
    plan = subprocess.run([sys.executable, "-m", "streammerge", "plan", cfg, "--json"], capture_output=True,
                          text=True, check=True)
    smallest = json.loads(plan.stdout)["smallest_max_memory_bytes"] // 2**20 + 1
    budgets = [f"{smallest + 32}MiB", f"{smallest + 96}MiB", "4GiB"]  # the baseline moves a little per process
    refs: dict[str, tuple[dict[str, bytes], int]] = {}
    for shard in SHARD_SIZES:
        out, trace = os.path.join(root, f"ref-{shard}", "out"), os.path.join(root, f"trace-{shard}.txt")
        shutil.rmtree(out, ignore_errors=True)
        if os.path.exists(trace):
            os.remove(trace)
        assert run(cfg, out, shard, "4GiB", trace=trace).returncode == 0
        with open(trace) as f:
            refs[shard] = (snapshot(out), sum(1 for _ in f))
    kills = identical = differed = failed = 0
    for trial in range(a.kills):
        shard, budget = rng.choice(SHARD_SIZES), rng.choice(budgets)
        want, points = refs[shard]
        out = os.path.join(root, "trial", "out")  # the same folder name as the reference: the card says it
        shutil.rmtree(out, ignore_errors=True)
        at = rng.randint(1, points)
        r = run(cfg, out, shard, budget, crash_at=at)
        kills += r.returncode == -9
        resumes = 0
        while True:
            again = rng.randint(1, points) if rng.random() < 1 / 3 and resumes < 3 else None
            r = run(cfg, out, shard, rng.choice(budgets), crash_at=again)
            resumes += 1
            if r.returncode == -9:
                kills += 1
                continue
            break
        if r.returncode != 0:
            failed += 1
            verdict = f"FAILED rc={r.returncode}: {r.stderr.strip()[-300:]}"
        elif snapshot(out) == want:
            identical += 1
            verdict = "identical"
        else:
            differed += 1
            verdict = "DIFFERENT BYTES"
        print(f"trial {trial + 1}: shards {shard}, budget {budget}, killed at point {at}/{points}, "
              f"{resumes} resume(s): {verdict}", flush=True)
    print(f"kills tried {kills}; trials {a.kills}: identical {identical}, different {differed}, failed {failed}")
    sys.exit(0 if identical == a.kills else 1)


if __name__ == "__main__":
    main()

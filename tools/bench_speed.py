#!/usr/bin/env python3
"""Speed benchmark on a generated model set, side by side in one run: streammerge against the I/O
floor and, when given, mergekit 0.1.5 (installed in a separate environment).

For each of linear (3 models), the seed's gradient slerp, ties and della (3 models each) and the 14-model
dare_ties (and with --only soup, a linear average of all 15 models: a model soup, whose many inputs
take linear's compiled loop) it prints the compute threads the run takes here (as `streammerge
plan` says; +rN: reading ahead on N threads), wall time, the merge's own time (less Python's
start-up and torch's import), the CPU seconds of the whole run (user and system, start-up
included; over the wall time, the cores it kept busy) and the system (kernel) part of them, and
peak RSS, and the I/O floor measured in the same run: reading every input byte once from a warm
page cache (--cold: from the disk) plus writing and syncing the output's size, the fastest of
five tries; both times also as multiples of the floor; and mergekit's wall and CPU seconds.

  python tools/bench_speed.py --dir /work/bench/medium [--set medium|7b] [--max-memory 1GiB] [--cap 512M]
                               [--mergekit /venv/bin/mergekit-yaml] [--variants cpu,j1,no-overlap,cuda] [--busy N]
                               [--cold]

--set 7b makes (once) 15 models of Mistral-7B's own tensor shapes (4096 x 14336 MLPs, 32000 x 4096
embeddings; 2 layers, ~1.4 GB each) instead of the medium set (hidden 1024, ~560 MB each).
--busy N runs every merge beside N processes spinning on the CPU (a loaded laptop).
--cold drops the inputs' pages from the page cache before every run, mergekit's and the floor's
read too (a laptop whose RAM cannot hold the inputs: every byte comes from the disk).

Variants (each a streammerge run of every config): cpu (the defaults: a compute thread per
core this process may use, at most 4, or 2 for linear, slerp, task_arithmetic and passthrough;
read-ahead and write-behind threads with 4 or more cores, or 2 for those four), j1 (-j 1: one
compute thread), j2, j4, j8, j16 (-j N), no-overlap (--no-overlap: one thread does the I/O in
order), overlap (--overlap: the helper threads whatever the cores), cuda (--device cuda),
cuda-no-overlap, nojit (STREAMMERGE_JIT=0: the torch forms instead of the compiled loops), jit
(STREAMMERGE_JIT=1: the loops whatever the merge's size). The unbounded variant runs without
--max-memory (half the available memory). A variant named again runs again, alternating with the
others in the order given (cpu,j1,cpu,j1), and has a row of its own (cpu#2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
MEMCAP = os.path.join(HERE, "memcap")
sys.path.insert(0, HERE)
from bench_common import (  # noqa: E402
    busy,
    dare_ties_14,
    ensure_set,
    evict,
    measure,
    shard_files,
    tensor_hashes,
    warm,
    write_floor,
)

SLERP_T = """parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""


def configs(folders: list[str]) -> dict[str, tuple[str, list[str]]]:
    """name -> (YAML, the input folders it reads)."""
    base, ft = folders[0], folders[1:]
    linear = (f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.5}}}}\n"
              f"  - {{model: {ft[0]}, parameters: {{weight: 0.3}}}}\n"
              f"  - {{model: {ft[1]}, parameters: {{weight: 0.2}}}}\n"
              "dtype: bfloat16\n")
    with open(os.path.join(base, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    slerp = (f"slices:\n  - sources:\n      - {{model: {base}, layer_range: [0, {layers}]}}\n"
             f"      - {{model: {ft[0]}, layer_range: [0, {layers}]}}\nmerge_method: slerp\nbase_model: {base}\n"
             + SLERP_T + "dtype: bfloat16\n")
    ties = (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}\n"
            + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for f in ft[:2])
            + "dtype: bfloat16\n")
    della = (f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {base}\n"
             + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n"
                       for f in ft[:2])
             + "dtype: bfloat16\n")
    dare = dare_ties_14(folders)
    soup = ("merge_method: linear\nmodels:\n" + "".join(f"  - {{model: {f}, parameters: {{weight: 1.0}}}}\n"
                                                       for f in folders[:15]) + "dtype: bfloat16\n")
    return {"linear (3 models)": (linear, folders[:3]), "slerp (gradient)": (slerp, folders[:2]),
            "ties (3 models)": (ties, folders[:3]), "della (3 models)": (della, folders[:3]),
            "dare_ties (15 models)": (dare, folders[:15]), "soup (15 models)": (soup, folders[:15])}


# The floor is measured this many times and the fastest try taken: on this project's 2-core machine
# the same 567 MB write and fsync took 0.1 s in one try and 1.2 s in the next, so one try could make
# a merge look twice as far from its floor, or half as far, as it is. What decides it is the disk
# (ext4 mounted with discard on a virtual disk): the write took 0.33-0.41 s right after a file was
# deleted (its blocks reused) and 1.2-1.8 s four seconds after (freed blocks discarded, allocated
# again by the host), whether or not 2 GiB of memory was touched just before (1.6-1.8 s). The first
# try follows a merge and writes fresh blocks, as a merge's own writes mostly do; the later ones
# mostly reuse the blocks the try before freed. The fastest is the fast state, the strictest floor:
# a merge measured against it looks as far from its floor as it can (its writes overlap its reads
# and kernels: in the slow state the 3-model linear merge took 1.3 s against a 2.0 s floor). The
# median of three was taken before, and was not always the fast state: one SLERP row's tries were
# 1.74, 1.49 and 0.56 s, its median 1.49, and the merge read 1.2x a floor it was 3.2x of; and in
# one linear row all three tries were 1.3 s or more (the merge 1.3 s: "1.00x"), so five are made.
FLOOR_TRIES = 5


def io_floors(files: list[str], start: Callable[[list[str]], object], path: str, out_bytes: int) -> list[float]:
    """FLOOR_TRIES measurements of the I/O floor: `files` read once as every run finds them (`start`
    first: warm, filled; cold, dropped), then `out_bytes` written and synced to a new file at `path`."""
    tries = []
    for _ in range(FLOOR_TRIES):
        start(files)
        read_s = warm(files)
        tries.append(read_s + write_floor(path, out_bytes))
    return tries


def threads_of(cfg: str, variant: str) -> str:
    """The compute threads a variant's run of `cfg` takes here, as `streammerge plan` says
    (executor.planned_threads), '+rN' where it reads ahead on N threads; '?' where it cannot plan
    (a GPU variant without a GPU)."""
    from streammerge import api
    from streammerge.executor import planned_threads
    from streammerge.options import RunOptions

    flags = VARIANTS[variant]
    opts = RunOptions(num_threads=int(flags[1]) if flags[:1] == ["-j"] else None,
                      overlap={"--overlap": True, "--no-overlap": False}.get(flags[-1]) if flags else None)
    try:
        plan = api.plans(cfg, "unused", opts, device="cuda" if "cuda" in flags else "cpu")[-1]
    except Exception:  # noqa: BLE001  (the run's own error is printed where it fails)
        return "?"
    th = planned_threads(plan, opts)
    return f"{th.compute}" + (f"+r{th.reading}" if th.read_ahead else "")


def merge_seconds(stderr: str) -> float:
    """The merge's own time from its summary line (wall time less interpreter and torch start-up)."""
    m = re.search(r"done: .*?, ([0-9.]+) s, peak RSS", stderr)
    return float(m.group(1)) if m else float("nan")


MERGES = ("linear", "slerp", "ties", "della", "dare_ties", "soup")  # the first word of each name configs() gives
DEFAULT_MERGES = MERGES[:5]  # the five; --only soup adds the 15-model linear
VARIANTS = {"cpu": [], "j1": ["-j", "1"], "j2": ["-j", "2"], "j4": ["-j", "4"], "j8": ["-j", "8"],
            "j16": ["-j", "16"], "no-overlap": ["--no-overlap"], "overlap": ["--overlap"], "unbounded": [],
            "cuda": ["--device", "cuda"], "cuda-no-overlap": ["--device", "cuda", "--no-overlap"],
            "nojit": [], "jit": []}
ENV = {"nojit": {"STREAMMERGE_JIT": "0"}, "jit": {"STREAMMERGE_JIT": "1"}}  # variants set by the environment
# Every timed command runs as on a user's machine: Python writes and reuses bytecode caches. (This
# project's machines set PYTHONDONTWRITEBYTECODE=1, so an editable streammerge recompiled its ~70
# modules, 0.4 s, on every start, while pip had compiled mergekit's and torch's at install.)
RUN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench/medium")
    ap.add_argument("--set", default="medium", choices=["medium", "7b"], help="the model set to make in --dir")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml of a separate environment")
    ap.add_argument("--only", default=None,
                    help="run only these merges, comma-separated: " + ", ".join(MERGES))
    ap.add_argument("--variants", default="cpu", help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--cap", default=None, help="run streammerge (not the unbounded variant, not mergekit) under "
                    "this hard memory cap (tools/memcap: a memory cgroup, page cache included), e.g. 512M")
    ap.add_argument("--busy", type=int, default=0,
                    help="run every merge (and mergekit) beside this many processes spinning on the CPU")
    ap.add_argument("--cold", action="store_true",
                    help="drop the inputs from the page cache before every run (and the floor's read)")
    a = ap.parse_args()
    variants = a.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    only = a.only.split(",") if a.only else list(DEFAULT_MERGES)
    if any(m not in MERGES for m in only):
        raise SystemExit(f"--only: choose from {', '.join(MERGES)}")
    root = os.path.abspath(a.dir)
    folders = ensure_set(root, a.set)
    # each tool started once before any timing, writing its bytecode caches as a first run would
    subprocess.run([sys.executable, "-c", "import streammerge.cli, streammerge.methods._jit"], env=RUN_ENV, check=True)
    if a.mergekit:
        subprocess.run([a.mergekit, "--help"], env=RUN_ENV, capture_output=True, check=True)
    rows = []
    for name, (yaml_text, inputs) in configs(folders).items():
        if name.split()[0] not in only:
            continue
        cfg = os.path.join(root, "bench-" + name.split()[0] + ".yml")
        with open(cfg, "w") as f:
            f.write(yaml_text)
        files = [p for d in inputs for p in shard_files(d)]
        start = evict if a.cold else warm  # how every run finds the inputs
        out = os.path.join(root, "out-" + name.split()[0])
        floor = None
        floors: list[float] = []
        runs = {}
        for k, v in enumerate(variants):
            label = v if v not in variants[:k] else f"{v}#{variants[:k + 1].count(v)}"
            shutil.rmtree(out, ignore_errors=True)
            start(files)  # warm: the run before may have evicted inputs (7B: mergekit's 21 GiB)
            with busy(a.busy):
                budget = [] if v == "unbounded" else ["--max-memory", a.max_memory]
                cmd = [sys.executable, "-m", "streammerge", "run", cfg, out, "-q", *budget, *VARIANTS[v]]
                if a.cap and v != "unbounded":
                    cmd = ["bash", MEMCAP, a.cap, "--", *cmd]
                sm = measure(cmd, {**RUN_ENV, **ENV.get(v, {})})
            if sm.rc != 0:
                print(f"streammerge ({label}) failed on {name}:\n{sm.stderr[-3000:]}", flush=True)
                continue
            for line in sm.stderr.splitlines():
                if line.startswith("MEMCAP"):
                    print(f"{name} ({label}): {line.split(' cmd=')[0]}", flush=True)
            runs[label] = (sm, tensor_hashes(out), threads_of(cfg, v))
            if floor is None:
                out_bytes = sum(os.path.getsize(p) for p in shard_files(out))
                floors = io_floors(files, start, os.path.join(root, "floor.tmp"), out_bytes)
                floor = min(floors)
        if floor is None:
            continue
        row = {"name": name, "runs": runs, "floor": floor}
        if a.mergekit:
            mk_out = os.path.join(root, "mk-" + name.split()[0])
            shutil.rmtree(mk_out, ignore_errors=True)
            start(files)
            with busy(a.busy):
                row["mk"] = measure([a.mergekit, cfg, mk_out], RUN_ENV)
        rows.append(row)
        tries = ", ".join(f"{f:.2f}" for f in floors)
        print(f"{name}: " + ", ".join(f"{v} {r[0].wall_s:.1f} s" for v, r in runs.items())
              + f", floor {floor:.2f} s (fastest of {tries})"
              + (f", mergekit {row['mk'].wall_s:.1f} s" if "mk" in row else ""), flush=True)
    load = f", beside {a.busy} busy processes" if a.busy else ", quiet"
    cap = f" under a {a.cap} memory cgroup" if a.cap else ""
    cache = "inputs dropped from the page cache before every run" if a.cold else "warm page cache"
    print(f"\n{a.set} set, {os.cpu_count()} cores{load}, {cache}, bytecode cached, "
          f"streammerge --max-memory {a.max_memory}{cap}")
    head = (f"{'merge':<22} {'variant':<16} {'threads':>7} {'wall s':>7} {'merge s':>7} {'CPU s':>6} {'sys s':>6} "
            f"{'peak RSS MiB':>12} "
            f"{'I/O floor s':>11} "
            f"{'x floor':>8} {'merge x floor':>13}")
    if a.mergekit:
        head += f" {'mergekit s':>10} {'mk CPU s':>8} {'mk RSS MiB':>10} {'sm/mk':>6}"
    print(head + "  same bytes as first variant")
    for r in rows:
        if not r["runs"]:
            continue
        first = next(iter(r["runs"].values()))[1]
        for v, (sm, hashes, threads) in r["runs"].items():
            merge_s = merge_seconds(sm.stderr)
            line = (f"{r['name']:<22} {v:<16} {threads:>7} {sm.wall_s:>7.2f} {merge_s:>7.2f} {sm.cpu_s:>6.2f} "
                    f"{sm.sys_s:>6.2f} {sm.peak_rss_mib:>12} "
                    f"{r['floor']:>11.2f} {sm.wall_s / r['floor']:>8.2f} {merge_s / r['floor']:>13.2f}")
            if "mk" in r:
                mk = r["mk"]
                ok = "" if mk.rc == 0 else " (failed)"
                line += f" {mk.wall_s:>10.1f} {mk.cpu_s:>8.1f} {mk.peak_rss_mib:>10} {sm.wall_s / mk.wall_s:>6.2f}{ok}"
            print(line + f"  {'yes' if hashes == first else 'NO'}")


if __name__ == "__main__":
    main()

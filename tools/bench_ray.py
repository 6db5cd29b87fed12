#!/usr/bin/env python3
"""Ray benchmark, side by side in one run: the seed's stage 1 (14-model DARE-TIES, verbatim) on
a Hugging Face cache of stand-ins, by the local executor and on Ray with 1, 2 and 4 workers,
plus the per-task overhead of the Ray path.

  python tools/bench_ray.py --cache /work/bench/progress-medium/hf-cache [--preset medium]
                            [--max-memory 1GiB] [--workers 1,2,4] [--busy N]

The cache is made (make_models.make_seed_cache) when it does not hold the seed's models. Every
run reads the same inputs from a warm page cache; the table gives wall time, input throughput,
the ratio to the local run, the driver's and the workers' peak RSS, and whether the output's
tensors are byte-identical to the local run's. Ray runs join one Ray instance started here
(`ray start --head --num-cpus W`, W the most workers asked, so W tasks of one CPU each can run
at once even on fewer cores; with RAY_worker_niceness=0, as streammerge's own instance has; its
start-up is reported apart); one more row lets the command
start its own instance (`--ray` with no address), start-up included.

The per-task overhead is measured in this process on the tiny 32-layer set (291 tensors): the
Ray run with one tensor per task, against the same run with the default grouping and the local
executor; (one-per-task - local) / tensors is what each Ray task costs beyond its work.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_models  # noqa: E402
from bench_common import busy, measure, sigterm_exits, tensor_hashes, warm  # noqa: E402

STAGE1 = os.path.join(HERE, "..", "examples", "mistral-7b-merge-14-v0.yml")


def seed_files(cache: str) -> list[str]:
    files = []
    for root, _dirs, names in os.walk(cache):
        files += [os.path.join(root, n) for n in names if n.endswith(".safetensors")]
    return files


def ensure_cache(cache: str, preset: str) -> None:
    if not any("models--" in d for d in (os.listdir(cache) if os.path.isdir(cache) else [])):
        print(f"making the seed's 16 stand-ins ({preset}) in {cache} ...", flush=True)
        make_models.make_seed_cache(cache, make_models.PRESETS[preset])


def worker_rss(stderr: str) -> str:
    m = re.search(r"the workers' peak RSS ([\d.]+ \w+)", stderr)
    return m.group(1) if m else "-"


def run_cli(out: str, args: list[str], cache: str) -> tuple[float, int, str, dict[str, str]]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_CACHE": cache}
    m = measure([sys.executable, "-m", "streammerge", "run", STAGE1, out, *args], env)
    if m.rc != 0:
        sys.exit(f"streammerge {' '.join(args)} failed:\n{m.stderr[-3000:]}")
    return m.wall_s, m.peak_rss_mib, worker_rss(m.stderr), tensor_hashes(out)


def overhead() -> list[str]:
    """Per-task cost of the Ray path on the tiny set, in this process, on a Ray instance of its own
    (its workers inherit this process's HF_HUB_CACHE: the tiny set's)."""
    import ray

    import streammerge
    import streammerge.distributed as dist

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        make_models.make_seed_cache(cache, make_models.PRESETS["tiny32"], seed=2, shard_bytes=400_000)
        os.environ["HF_HUB_CACHE"] = cache

        def timed(name: str, **kw: object) -> float:
            out = os.path.join(tmp, name)
            t0 = time.monotonic()
            streammerge.merge(STAGE1, out, max_memory="1GiB", **kw)  # type: ignore[arg-type]
            took = time.monotonic() - t0
            shutil.rmtree(out)
            return took

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        address = "local"  # merge() uses the connection made here
        timed("warm")  # the page cache and torch's first calls
        timed("warm-ray", ray=address)  # Ray's worker processes started, torch imported in them
        local = timed("local")
        grouped = timed("grouped", ray=address)
        default_group = dist.GROUP_READ_BYTES
        dist.GROUP_READ_BYTES = 1  # every group one tensor
        try:
            single = timed("single", ray=address)
        finally:
            dist.GROUP_READ_BYTES = default_group
            ray.shutdown()
        n = len(streammerge.plan(STAGE1).tasks)
        lines.append(f"tiny set, {n} tensors: local {local:.2f} s; Ray default grouping {grouped:.2f} s; "
                     f"Ray one tensor per task {single:.2f} s")
        lines.append(f"per-task overhead: ({single:.2f} - {local:.2f}) / {n} = {(single - local) / n * 1000:.1f} ms "
                     f"per task; with the default grouping the whole run costs {grouped - local:+.2f} s over local")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a Hugging Face cache holding (or to hold) the seed's models")
    ap.add_argument("--preset", default="medium", choices=sorted(make_models.PRESETS))
    ap.add_argument("--max-memory", default="1GiB", help="each process's budget (driver and every worker)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--busy", type=int, default=0, help="spinning processes beside every run")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="only the per-task overhead on the tiny set")
    a = ap.parse_args()
    if a.overhead_only:
        print("\n".join(overhead()))
        return
    ensure_cache(a.cache, a.preset)
    files = seed_files(a.cache)
    size = sum(os.path.getsize(f) for f in files)
    warm(files)
    floor = warm(files)
    workers = [int(w) for w in a.workers.split(",")]
    print(f"inputs {size / 2**30:.2f} GiB in {len(files)} files; read floor (warm) {floor:.1f} s; "
          f"{os.cpu_count()} CPUs; busy {a.busy}; --max-memory {a.max_memory} per process", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench-ray-")
    rows: list[tuple[str, float, int, str, bool]] = []

    def row(label: str, wall: float, rss: int, wr: str, same: bool) -> None:
        rows.append((label, wall, rss, wr, same))
        print(f"  {label}: {wall:.1f} s, driver {rss} MiB, workers {wr}, identical {same}", flush=True)

    try:
        with busy(a.busy):
            wall, rss, _, ref = run_cli(os.path.join(tmp, "local"), ["--max-memory", a.max_memory], a.cache)
            row("local executor", wall, rss, "-", True)
            args = ["--max-memory", a.max_memory, "--ray", "--workers", "2"]
            wl, rs, wr, got = run_cli(os.path.join(tmp, "rayown"), args, a.cache)
            row("--ray (its own instance, start-up included), 2 workers", wl, rs, wr, got == ref)
        t0 = time.monotonic()
        head = subprocess.run(["ray", "start", "--head", f"--num-cpus={max(workers)}", "--include-dashboard=false",
                               "--disable-usage-stats"], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_CACHE": a.cache, "RAY_worker_niceness": "0"})
        if head.returncode != 0:
            sys.exit(f"ray start failed:\n{head.stderr[-2000:]}")
        started = time.monotonic() - t0
        addr = "auto"  # the instance `ray start` made (this also reads the token `ray start` saved)
        with busy(a.busy):
            for w in workers:
                for write in ("auto", "driver") if w == 2 else ("auto",):
                    args = ["--max-memory", a.max_memory, "--ray", addr, "--workers", str(w), "--ray-write", write]
                    wl, rs, wr, got = run_cli(os.path.join(tmp, f"ray{w}{write}"), args, a.cache)
                    how = "workers write in place" if write == "auto" else "the driver writes"
                    row(f"Ray, {w} worker(s), {how}", wl, rs, wr, got == ref)
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    local = rows[0][1]
    print(f"\nRay head started in {started:.1f} s (not in the rows below that join it)\n")
    print("| run | wall | input read | vs local | driver peak RSS | workers' peak RSS | identical bytes |")
    print("|---|---|---|---|---|---|---|")
    for label, wall, rss, wr, same in rows:
        print(f"| {label} | {wall:.1f} s | {size / wall / 2**20:.0f} MiB/s | {wall / local:.2f}x | {rss} MiB | {wr} | "
              f"{'yes' if same else 'NO'} |")
    if not a.skip_overhead:
        print("\n".join(overhead()))


if __name__ == "__main__":
    with sigterm_exits():  # a timeout's SIGTERM still removes the temporary folders
        main()

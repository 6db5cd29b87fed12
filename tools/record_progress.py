"""Record what a user sees: the seed's stage 1 in a terminal (tmux), the screen captured every
second; Ctrl-C half way; then the same command again, which says how many tensors it resumes.

    python tools/record_progress.py [--dir progress-run] [--preset small] [--interrupt-after 30]

Checks and prints: from the first capture on, the bar's line changes at least every two seconds;
it shows the read rate and the memory against the budget; after Ctrl-C the tensor count shown
("K/N tensors saved") equals the count the rerun keeps ("resuming ...: K of N tensors already done").
The captures go to DIR/captures.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_models  # noqa: E402

STAGE1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "mistral-7b-merge-14-v0.yml")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def bar_line(screen: str) -> str:
    lines = [ln for ln in screen.splitlines() if re.search(r"\bread: ", ln) and "|" in ln]
    return lines[-1].strip() if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="progress-run")
    ap.add_argument("--preset", default="small", choices=sorted(make_models.PRESETS))
    ap.add_argument("--interrupt-after", type=float, default=30.0, help="seconds before Ctrl-C")
    ap.add_argument("--max-memory", default="1GiB")
    a = ap.parse_args()
    root = os.path.abspath(a.dir)
    cache = os.path.join(root, "hf-cache")
    if not os.path.isdir(cache):
        print(f"making the seed's 16 stand-ins ({a.preset}) in {cache} ...", flush=True)
        make_models.make_seed_cache(cache, make_models.PRESETS[a.preset], seed=3, shard_bytes=400_000_000)
    out = os.path.join(root, "out")
    cmd = (f"cd {shlex.quote(os.getcwd())} && HF_HUB_CACHE={shlex.quote(cache)} {shlex.quote(sys.executable)} -m "
           f"streammerge run {shlex.quote(STAGE1)} {shlex.quote(out)} --max-memory {a.max_memory} "
           "--restart --overwrite; "
           "echo EXIT=$?; sleep 600")
    session = f"sm-progress-{os.getpid()}"
    tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "12", cmd)
    captures: list[tuple[float, str]] = []
    t0 = time.monotonic()
    interrupted = False
    try:
        while True:
            time.sleep(1.0)
            screen = tmux("capture-pane", "-p", "-t", session)
            captures.append((time.monotonic() - t0, screen))
            if not interrupted and time.monotonic() - t0 >= a.interrupt_after:
                tmux("send-keys", "-t", session, "C-c")
                interrupted = True
            if "EXIT=" in screen:
                break
            if time.monotonic() - t0 > 900:
                raise SystemExit("the run did not end within 15 minutes")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    with open(os.path.join(root, "captures.txt"), "w") as f:
        for t, screen in captures:
            f.write(f"--- {t:6.1f} s\n{screen.rstrip()}\n")
    lines = [(t, bar_line(s)) for t, s in captures]
    shown = [(t, ln) for t, ln in lines if ln]
    assert shown, "no progress bar was ever shown"
    first = shown[0][0]
    before = [(t, ln) for t, ln in shown if t <= a.interrupt_after]
    stalls = [(t1, t2) for (t1, l1), (t2, l2) in zip(before, before[1:]) if l1 == l2]
    gaps = [t2 - t1 for (t1, _), (t2, _) in zip(before, before[1:])]
    final = bar_line(captures[-1][1]) or shown[-1][1]
    m = re.search(r"(\d+)/(\d+) tensors saved", final)
    assert m, final
    rerun = subprocess.run([sys.executable, "-m", "streammerge", "run", STAGE1, out, "--max-memory", a.max_memory],
                           env={**os.environ, "HF_HUB_CACHE": cache}, capture_output=True, text=True)
    r = re.search(r"resuming an interrupted run: (\d+) of (\d+) tensors already done", rerun.stderr)
    assert r and rerun.returncode == 0, rerun.stderr[-2000:]
    print(f"first bar after {first:.1f} s; {len(before)} captures before Ctrl-C at {a.interrupt_after:.0f} s, "
          f"unchanged between consecutive captures {len(stalls)} time(s), longest capture gap {max(gaps):.1f} s")
    print(f"read rate shown: {'/s' in before[-1][1]}; memory shown: {'RSS' in before[-1][1]}")
    print(f"after Ctrl-C the bar shows {m.group(1)}/{m.group(2)} tensors saved; the rerun resumed {r.group(1)} of "
          f"{r.group(2)}: {'EQUAL' if m.group(1) == r.group(1) else 'DIFFERENT'}")
    for t, ln in before[:: max(1, len(before) // 8)]:
        print(f"  {t:5.1f} s  {ln}")
    print(f"  final     {final}")
    if stalls or m.group(1) != r.group(1):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

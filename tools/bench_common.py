"""What the benchmarks share: the medium model set, and running a command with its wall time and peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_models  # noqa: E402

_MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(u.ru_maxrss, rc, u.ru_utime, u.ru_stime, file=sys.stderr)")


@dataclass(frozen=True)
class Measured:
    rc: int
    wall_s: float
    peak_rss_mib: int  # of the command's process tree's largest process
    stderr: str
    # CPU seconds of the command's whole process tree (every process it waited for), start-up
    # included: user and system time together, and the system (kernel) part of it
    cpu_s: float
    sys_s: float


SETS = {  # name: (make_models preset, size of one model)
    "medium": ("medium", "~560 MB"),  # hidden 1024, intermediate 3584, 16 layers, vocab 32000
    "7b": ("7b", "~1.4 GB"),  # Mistral-7B's hidden 4096, intermediate 14336 and vocab 32000; 2 layers
}


def ensure_set(root: str, name: str = "medium", count: int = 15) -> list[str]:
    """A model set of preset `name` (SETS) in `root`: a base and count - 1 fine-tunes, made if missing."""
    folders = [os.path.join(root, "base")] + [os.path.join(root, f"ft{k}") for k in range(1, count)]
    if not all(os.path.isfile(os.path.join(f, "model.safetensors.index.json")) for f in folders):
        preset, size = SETS[name]
        print(f"making the {name} set in {root} ({count} x {size}) ...", flush=True)
        make_models.write_set(folders, make_models.PRESETS[preset])
    return folders


def ensure_medium_set(root: str, count: int = 15) -> list[str]:
    """The medium set (hidden 1024, intermediate 3584, 16 layers, vocab 32000, ~560 MB each), made if missing."""
    return ensure_set(root, "medium", count)


def dare_ties_14(folders: list[str]) -> str:
    """The seed's stage-1 recipe on local folders: folders[0] the base, the next 14 fine-tunes."""
    lines = ["merge_method: dare_ties", f"base_model: {folders[0]}", "models:", f"  - model: {folders[0]}"]
    for k, f in enumerate(folders[1:15]):
        lines += [f"  - model: {f}", f"    parameters: {{weight: 0.08, density: {0.5 if k == 13 else 0.4}}}"]
    return "\n".join(lines + ["parameters:", "  int8_mask: true", "dtype: bfloat16", ""])


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` in a fresh wrapper process, so RUSAGE_CHILDREN's peak is this command's alone."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    rss_kb, rc, user, system = p.stderr.strip().splitlines()[-1].split()
    return Measured(int(rc), wall, int(rss_kb) // 1024, p.stderr, float(user) + float(system), float(system))


def shard_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def warm(paths: list[str]) -> float:
    """Read every byte of `paths` once (filling the page cache); returns the seconds it took."""
    t0 = time.monotonic()
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.monotonic() - t0


def evict(paths: list[str]) -> None:
    """Drop `paths`' pages from the page cache (posix_fadvise DONTNEED: clean pages go at once, no
    root needed), so the next read comes from the disk — a laptop whose RAM cannot hold the inputs."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_floor(path: str, nbytes: int) -> float:
    """Seconds to write and fsync `nbytes` to a new file at `path` (then removed)."""
    block = b"\0" * (16 << 20)
    t0 = time.monotonic()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(len(block), left)])
        f.flush()
        os.fsync(f.fileno())
    took = time.monotonic() - t0
    os.unlink(path)
    return took


def tensor_hashes(out: str) -> dict[str, str]:
    with open(os.path.join(out, "streammerge.manifest.json")) as f:
        return {k: v["xxh3_128"] for k, v in json.load(f)["tensors"].items()}


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Inside, SIGTERM (what `timeout` and a plain `kill` send) raises SystemExit in the main thread,
    so the `finally` blocks and context managers around the work run: spinning processes stopped,
    temporary model sets removed. By default it ends Python at once, skipping them: runs of
    bench_ray.py that a `timeout` ended had left 13 temporary model sets (133 MB each) in /tmp."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """`n` processes spinning on the CPU beside whatever runs inside (a laptop with a browser and a
    build running); stopped on the way out, a SIGTERM's way included (sigterm_exits)."""
    with sigterm_exits():
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        try:
            yield
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()

"""The command line (click's CliRunner): plan output and JSON, byte-size options, the budget
check at plan time, and exit codes with messages instead of tracebacks; the console script's
entry in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from streammerge.cli import ByteSize, main


def config(tmp_path, folders: list[str], method: str = "ties") -> str:
    models = "\n".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}" for f in folders[1:])
    path = tmp_path / "merge.yml"
    path.write_text(f"merge_method: {method}\nbase_model: {folders[0]}\nmodels:\n  - model: {folders[0]}\n{models}\n")
    return str(path)


def test_plan_shows_tensors_shards_and_memory(tiny_set, tmp_path) -> None:
    r = CliRunner().invoke(main, ["plan", config(tmp_path, tiny_set), "--max-memory", "16GiB"])
    assert r.exit_code == 0, r.output
    assert "method: ties    models: 4    tensors: 39" in r.output
    assert "--max-memory 16384 MiB, expected peak" in r.output and "use at least" in r.output
    assert "model.layers.3.mlp.up_proj.weight  [160, 64] BF16" in r.output


def test_plan_json(tiny_set, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("STREAMMERGE_JIT", raising=False)  # the default choice, whatever the suite runs under
    r = CliRunner().invoke(main, ["plan", config(tmp_path, tiny_set), "--json", "--out-shard-size", "100K"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["method"] == "ties" and len(p["tensors"]) == 39 and len(p["shards"]) > 1
    assert p["smallest_max_memory_bytes"] <= p["expected_peak_bytes"]
    # the figure to ask a user for: the smallest with room for what a run's process holds more
    assert p["suggested_max_memory_bytes"] - p["smallest_max_memory_bytes"] >= 24 << 20
    assert p["suggested_max_memory_bytes"] % (8 << 20) == 0
    assert p["tensors"][0]["per_input"][1] == {"weight": 0.5, "density": 0.5}
    # a merge this small runs torch's forms, and says why
    assert p["kernels"]["compiled"] is False and "element-inputs, under the 67M" in p["kernels"]["why"]


@pytest.mark.parametrize("mode", ["0", "1"])
def test_plan_says_which_kernels_a_run_takes(tiny_set, tmp_path, monkeypatch, mode) -> None:
    """The same bytes come from either form; `plan` says which a run would take here and why."""
    import importlib.util

    monkeypatch.setenv("STREAMMERGE_JIT", mode)
    cfg = config(tmp_path, tiny_set)
    p = json.loads(CliRunner().invoke(main, ["plan", cfg, "--json"]).output)
    have_numba = importlib.util.find_spec("numba") is not None
    assert p["kernels"]["compiled"] is (mode == "1" and have_numba)
    text = CliRunner().invoke(main, ["plan", cfg]).output
    assert f"kernels: {p['kernels']['why']}\n" in text
    assert ("STREAMMERGE_JIT=" + mode) in text or not have_numba
    plain = tmp_path / "karcher.yml"
    plain.write_text("merge_method: karcher\nmodels:\n" + "".join(f"  - {{model: {f}}}\n" for f in tiny_set[:2]))
    karcher = CliRunner().invoke(main, ["plan", str(plain)]).output
    assert "kernels: torch's kernels (karcher has no compiled loops)" in karcher, karcher


@pytest.mark.parametrize("value", ["-1", "1025", "100000"])
def test_a_thread_count_out_of_range_is_a_usage_error(tiny_set, tmp_path, value) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", config(tmp_path, tiny_set), str(out), "-j", value])
    assert r.exit_code == 2 and "'-j' / '--num-threads'" in r.output and "0<=x<=1024" in r.output, r.output
    assert not out.exists()


def test_threads_the_system_refuses_are_an_error_and_the_run_resumes(tiny_set, tmp_path, monkeypatch) -> None:
    """A -j the system cannot start threads for (ulimit -u, a container's pids.max) stops the merge
    with a message, not a traceback; once the count is smaller the same command finishes it."""
    import threading

    from helpers import output_digest

    from streammerge import reader, runner

    monkeypatch.setattr(runner, "PARALLEL_MIN_ELEMENTS", 0)  # every block handed to the threads
    monkeypatch.setattr(reader, "PARALLEL_MIN_ELEMENTS", 0)
    cfg = config(tmp_path, tiny_set)
    whole = tmp_path / "whole"
    assert CliRunner().invoke(main, ["run", cfg, str(whole), "-j", "1"]).exit_code == 0
    real_start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        if self.name.startswith("streammerge-kernel"):
            raise RuntimeError("can't start new thread")
        real_start(self)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refused)
        r = CliRunner().invoke(main, ["run", cfg, str(out), "-j", "8"])
    assert r.exit_code == 2, r.output
    assert "the system refused another thread" in r.output and "smaller -j/--num-threads" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["run", cfg, str(out), "-j", "2"])
    assert r.exit_code == 0, r.output
    assert output_digest(str(out)) == output_digest(str(whole))


def test_budget_too_small_fails_at_plan_time_naming_tensor(tiny_set, tmp_path) -> None:
    out = tmp_path / "out"
    for cmd in (["plan", config(tmp_path, tiny_set)], ["run", config(tmp_path, tiny_set), str(out)]):
        r = CliRunner().invoke(main, [*cmd, "--max-memory", "10M"])
        assert r.exit_code == 5
        assert "--max-memory 9MiB is too small: tensor" in r.output and "use at least --max-memory" in r.output
        assert ("CUDA build" in r.output) == bool(torch.version.cuda)
    assert not out.exists()


def test_a_budget_refused_under_torchs_cuda_build_says_what_it_costs(tiny_set, tmp_path, monkeypatch) -> None:
    """A merge on the CPU refused its budget where torch is a CUDA build (torch.version.cuda set, as
    pip's default wheel on Linux) says that build holds more and how to install the CPU one; a CPU
    build's refusal does not."""
    for cuda in ("13.0", None):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        r = CliRunner().invoke(main, ["plan", config(tmp_path, tiny_set), "--max-memory", "10M"])
        assert r.exit_code == 5 and "is too small" in r.output
        hint = "is a CUDA build" in r.output and "download.pytorch.org/whl/cpu" in r.output
        assert hint == bool(cuda), r.output


@pytest.mark.parametrize("text,value", [("512M", 512 * 10**6), ("2GiB", 2 * 2**30), ("5B", 5 * 10**9),
                                        ("1000", 1000), ("1.5kib", 1536)])
def test_byte_sizes(text, value) -> None:
    assert ByteSize().convert(text, None, None) == value


def test_bad_byte_size_is_a_usage_error(tiny_set, tmp_path) -> None:
    r = CliRunner().invoke(main, ["plan", config(tmp_path, tiny_set), "--max-memory", "lots"])
    assert r.exit_code == 2 and "'lots' is not a size" in r.output


def test_missing_config_file(tmp_path) -> None:
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.yml")])
    assert r.exit_code == 3 and "cannot read the config file" in r.output


_ENTRY = r"""
import atexit, sys
mark = sys.argv.pop()
atexit.register(lambda: open(mark, "w").write("atexit ran"))
sys.stdout.write("said before\n")  # a pipe's buffer: click flushes stdout only when it writes there
from streammerge.cli import entry
entry()
print("not reached")
"""


@pytest.mark.parametrize("args, code, stream, text", [
    (["--version"], 0, "stdout", "streammerge, version"),
    (["plan", "nope.yml"], 3, "stderr", "cannot read the config file"),
])
def test_the_command_ends_the_process_with_mains_status_and_everything_said(tmp_path, args, code, stream,
                                                                           text) -> None:
    """The console script's entry ends the process without the interpreter's teardown (os._exit), yet
    as exit does: main's status, the atexit handlers run, the standard streams (pipes here, so
    block-buffered) flushed, and nothing after it."""
    mark = tmp_path / "atexit"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-c", _ENTRY, *args, str(mark)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == code, r.stderr
    assert text in getattr(r, stream)
    assert "said before" in r.stdout and "not reached" not in r.stdout
    assert mark.read_text() == "atexit ran"


_HEAVY = """
import sys
from streammerge.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("status", e.code)
print("loaded:", sorted(m for m in ("torch", "numpy", "safetensors", "numba") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"], ["plan", "--help"],
                                  ["run", "--max-memory", "lots", "c.yml", "out"]])
def test_help_version_and_usage_errors_answer_without_importing_torch(tmp_path, args) -> None:
    """What answers without reading a config (help, the version, a bad option) loads neither torch
    nor numpy: importing torch takes seconds, longer than everything else these commands do."""
    r = subprocess.run([sys.executable, "-c", _HEAVY, *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    status = 2 if "lots" in args else 0
    assert f"status {status}" in r.stdout and "loaded: []" in r.stdout, (r.stdout, r.stderr)


_GC = r"""
import atexit, gc, sys
mark = sys.argv.pop()
atexit.register(lambda: open(mark, "w").write(f"{gc.isenabled()} {gc.get_freeze_count()} {'torch' in sys.modules}"))
from streammerge.cli import entry
entry()
"""


def test_a_command_runs_with_the_collector_on_and_its_imports_frozen(tiny_set, tmp_path) -> None:
    """entry() holds the garbage collector off only while the command's modules load: the command
    itself (a merge can run for hours) collects, and the imports' objects are frozen out of it."""
    mark = tmp_path / "gc"
    r = subprocess.run([sys.executable, "-c", _GC, "plan", config(tmp_path, tiny_set), str(mark)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    enabled, frozen, torch_loaded = mark.read_text().split()
    assert enabled == "True" and torch_loaded == "True"
    assert int(frozen) > 10_000  # torch's modules, classes and functions among them


_BLAS = r"""
import atexit, os, sys
mark = sys.argv.pop()
def threads():
    import numpy  # noqa: F401  (imported by the command already)
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    open(mark, "w").write(f"{os.environ.get('OPENBLAS_NUM_THREADS')} {len(names)}")
atexit.register(threads)
from streammerge.cli import entry
entry()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="counts a process's threads in Linux's /proc, with 2 or more cores")
@pytest.mark.parametrize("asked", [None, "2"])
def test_the_command_keeps_numpys_blas_on_one_thread_unless_told(tiny_set, tmp_path, asked) -> None:
    """OpenBLAS, as pip's numpy ships it, starts a thread per core but one at import, each spinning
    for work ~0.1 s: the command sets OPENBLAS_NUM_THREADS=1 before numpy is imported, so `plan`
    (numpy and torch imported, no merge's threads) ends with the threads it had without numpy; a
    user's own setting is kept, and then OpenBLAS starts its thread."""
    mark = tmp_path / "blas"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if asked:
        env["OPENBLAS_NUM_THREADS"] = asked
    r = subprocess.run([sys.executable, "-c", _BLAS, "plan", config(tmp_path, tiny_set), str(mark)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    setting, count = mark.read_text().split()
    baseline = subprocess.run([sys.executable, "-c", "import os, torch; print(len(os.listdir('/proc/self/task')))"],
                              capture_output=True, text=True, env={**env, "OPENBLAS_NUM_THREADS": "1"}, timeout=300)
    without_blas = int(baseline.stdout)
    assert setting == (asked or "1")
    assert int(count) == (without_blas + 1 if asked else without_blas), (count, without_blas)

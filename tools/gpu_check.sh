#!/usr/bin/env bash
# The checks for a lent GPU machine (16 cores), as one script (CI has none). In order of what only
# such a machine can show, each step time-boxed so that a short lease still gets the first ones:
#   0. the machine (cores, CPU quota, torch's threads, numba), and numba's cache filled for every
#      group of kernels (a helper's compile, as the first merge after an install does), so that no
#      timed run below pays it;
#   1. the many-core table (issue 15): the 14-model DARE-TIES on the medium set at a 1 GiB budget
#      at 1, 2, 4, 8 and 16 compute threads and the defaults, every variant's bytes compared (the
#      set is made first, ~8.5 GB). Not 512 MiB: that machine's torch is a CUDA build, whose import
#      alone holds ~500 MiB, and the merge asks for at least 616 MiB there (README, torch);
#   2. the same merge on a loaded 16-core machine (32 processes spinning: two per core), the
#      defaults (at most 4 threads) against -j 1 and -j 16 (whether, beside other programs, more
#      threads than the cap would take a larger share of the cores and win);
#   3. the 4- and 16-thread runs' CPU seconds per thread role (tools/thread_cpu.py; threads Python
#      did not start by their kernel names: on December 4 thirty of them took 3.8 s, unnamed);
#   3b. where py-spy was carried (.whl/py_spy-*.whl, installed to /tmp/site: the device README's
#      wheels), Python's lock held during the 4- and 16-thread runs (tools/gil_profile.py): the part
#      of the merge no number of compute threads shares. To carry it (2.9 MB): `echo /.whl/ >>
#      .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12
#      --platform manylinux1_x86_64 -d .whl py-spy==0.4.3`, and name .whl in the run's carry;
#   4. tests/test_gpu.py (masks and fixed-order sums equal the CPU's, every method against the CPU,
#      GPU bytes independent of GPU chunking and read-ahead, the CLI with --device cuda), with a
#      per-method report of how many output bytes equal the CPU's;
#   5. the speed benchmark on the medium set, side by side: CPU with read-ahead/write-behind, CPU
#      without, GPU.
# Runs from the repository root without installing (PYTHONPATH); writes logs to $OUT (default
# /tmp/gpu-check), seven files. No memory cap is set there: --max-memory alone bounds the runs.
# The steps' boxes add up to 590 s beside the compiles (37 s on December 4), 530 without py-spy:
# in a 580 s call the last step is cut if every box before it fills (on December 4, with the set
# made, the 1 GiB table and the GPU tests took ~130 s, the GPU benchmark ~130 s).
# Usage: bash tools/gpu_check.sh [MEDIUM_DIR]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
MEDIUM=${1:-/tmp/medium}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    echo "nproc $(nproc); cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo none)"
    lscpu | grep -E '^(Model name|Thread|Core|Socket|NUMA node\(s\)|L3)'
    python3 -c "import torch, numpy, numba, os, sys; from streammerge import executor
print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'torch threads', torch.get_num_threads(), 'affinity', len(os.sched_getaffinity(0)), 'streammerge cores', executor.cores())"
    for g in sums slerp linear family; do
        s=$SECONDS
        timeout 60 python3 -c "from streammerge.methods import fused; fused.compile_group('$g')"
        echo "compiled $g (rc $?) in $((SECONDS - s)) s"
    done
} 2>&1 | tee "$OUT/env.log"
timeout 200 python3 tools/bench_speed.py --dir "$MEDIUM" --max-memory 1GiB --only dare_ties \
    --variants j1,j2,j4,j8,j16,cpu 2>&1 | tee "$OUT/cores.log"
timeout 90 python3 tools/bench_speed.py --dir "$MEDIUM" --max-memory 1GiB --only dare_ties \
    --variants cpu,j1,j16 --busy 32 2>&1 | tee "$OUT/busy.log"
# where the 4- and 16-thread runs' time went: CPU seconds per thread role (compute, reading, main)
for j in 4 16; do
    rm -rf /tmp/thread-cpu-out
    timeout 30 python3 tools/thread_cpu.py -- run "$MEDIUM/bench-dare_ties.yml" /tmp/thread-cpu-out -q \
        --max-memory 1GiB -j $j 2>&1 | tee -a "$OUT/thread_cpu.log"
done
SPY=$(command -v py-spy || echo /tmp/site/bin/py-spy)
if ls .whl/py_spy-*.whl >/dev/null 2>&1 && [ ! -x "$SPY" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py_spy-*.whl
fi
if [ -x "$SPY" ]; then
    for j in 4 16; do
        rm -rf /tmp/gil-out
        timeout 30 python3 tools/gil_profile.py --py-spy "$SPY" --top 15 -- run "$MEDIUM/bench-dare_ties.yml" \
            /tmp/gil-out -q --max-memory 1GiB -j $j 2>&1 | tee -a "$OUT/thread_cpu.log"
    done
fi
rm -f "$OUT/gpu_report.jsonl"
STREAMMERGE_GPU_REPORT="$OUT/gpu_report.jsonl" timeout 60 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_overlap.py 2>&1 | tee "$OUT/pytest.log"
timeout 120 python3 tools/bench_speed.py --dir "$MEDIUM" --variants cpu,no-overlap,cuda 2>&1 | tee "$OUT/bench.log"

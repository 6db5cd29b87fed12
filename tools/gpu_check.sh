#!/usr/bin/env bash
# The checks for a lent GPU machine, as one script (CI has none). In order of what only such a
# machine can show, each step time-boxed so that a short lease still gets the first ones:
#   1. the many-core table (issue 15): the 14-model DARE-TIES on the medium set at 1, 2, 4, 8 and
#      16 compute threads, every variant's bytes compared (the set is made first, ~8.5 GB), then
#      the 16-thread run's CPU seconds per thread role (tools/thread_cpu.py);
#   2. tests/test_gpu.py (masks and fixed-order sums equal the CPU's, every method against the CPU,
#      GPU bytes independent of GPU chunking and read-ahead, the CLI with --device cuda), with a
#      per-method report of how many output bytes equal the CPU's;
#   3. the speed benchmark on the medium set, side by side: CPU with read-ahead/write-behind, CPU
#      without, GPU.
# Runs from the repository root without installing (PYTHONPATH); writes logs to $OUT (default
# /tmp/gpu-check). No memory cgroup is assumed there (gVisor): the runs are not capped. The three
# steps fit one 600 s call (280 + 40 + 100 + 160 s).
# Usage: bash tools/gpu_check.sh [MEDIUM_DIR]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
MEDIUM=${1:-/tmp/medium}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, os; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'threads', torch.get_num_threads(), 'cores', len(os.sched_getaffinity(0)))"
timeout 280 python3 tools/bench_speed.py --dir "$MEDIUM" --max-memory 512MiB --only dare_ties \
    --variants j1,j2,j4,j8,j16 2>&1 | tee "$OUT/cores.log"
# where the 16-thread run's time went: CPU seconds per thread role (compute, reading, main)
rm -rf /tmp/thread-cpu-out
timeout 40 python3 tools/thread_cpu.py -- run "$MEDIUM/bench-dare_ties.yml" /tmp/thread-cpu-out -q \
    --max-memory 512MiB -j 16 2>&1 | tee "$OUT/thread_cpu.log"
rm -f "$OUT/gpu_report.jsonl"
STREAMMERGE_GPU_REPORT="$OUT/gpu_report.jsonl" timeout 100 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_overlap.py 2>&1 | tee "$OUT/pytest.log"
cat "$OUT/gpu_report.jsonl" 2>/dev/null
timeout 160 python3 tools/bench_speed.py --dir "$MEDIUM" --variants cpu,no-overlap,cuda 2>&1 | tee "$OUT/bench.log"

#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (CI has none):
#   1. tests/test_gpu.py (masks and fixed-order sums equal the CPU's, every method against the CPU,
#      GPU bytes independent of GPU chunking and read-ahead, the CLI with --device cuda), with a
#      per-method report of how many output bytes equal the CPU's;
#   2. the speed benchmark on the medium set, side by side: CPU with read-ahead/write-behind, CPU
#      without, GPU.
# Runs from the repository root without installing (PYTHONPATH); writes logs to $OUT (default
# /tmp/gpu-check).  Usage: bash tools/gpu_check.sh [MEDIUM_DIR]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
MEDIUM=${1:-/tmp/medium}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, os; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'threads', torch.get_num_threads(), 'cores', len(os.sched_getaffinity(0)))"
rm -f "$OUT/gpu_report.jsonl"
STREAMMERGE_GPU_REPORT="$OUT/gpu_report.jsonl" timeout 120 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_overlap.py 2>&1 | tee "$OUT/pytest.log"
cat "$OUT/gpu_report.jsonl" 2>/dev/null
timeout 290 python3 tools/bench_speed.py --dir "$MEDIUM" --variants cpu,no-overlap,cuda 2>&1 | tee "$OUT/bench.log"

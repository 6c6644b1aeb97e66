#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton installed, no package registry):
# build the extension in place, run the GPU tests, run the GPU microbenchmarks, print a short table
# last. Full logs and JSON go under $OUT when it is set (else benchmarks/results/gpu_check).
# Budget: under 8 minutes on an H200, by construction: each step has a time limit and the limits
# add up to 470 s. Exit status: non-zero if any step failed or ran out of time.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HIERTCN_BENCH_DEVICE=cuda HIERTCN_BENCH_OUT="$OUT_DIR"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  if ! timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "!!! $name failed (exit $?); last lines:"
    status=1
  fi
  tail -n 25 "$OUT_DIR/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"

# Hopper only here: one architecture keeps the build short.
step build 150 env HIERTCN_CUDA=1 HIERTCN_CUDA_ARCHS="${HIERTCN_CUDA_ARCHS:-9.0}" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .
step info 20 $PY -m hiertcn_fast info
step gpu_tests 90 $PY -m pytest tests -q -m gpu -p no:cacheprovider
step triton_tests 50 $PY -m pytest tests -q -k "triton or cuda" -m "not gpu" -p no:cacheprovider
step benchmarks 130 $PY -m pytest benchmarks -q
step data_bench 30 $PY benchmarks/bench_data.py --quick

echo "=== summary"
$PY benchmarks/summarize.py "$OUT_DIR"/*.json 2>&1 | tee "$OUT_DIR/summary.txt"
exit $status

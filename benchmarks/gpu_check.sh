#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton installed, no package registry):
# build the extension in place, run the GPU tests, run the GPU microbenchmarks, print a short table
# last. Logs and JSON go to a work folder (benchmarks/results/gpu_check); when $OUT is set (the device
# tool, which returns at most 8 files) exactly two files go there: summary.txt and gpu_check.tgz (every
# log and JSON).
# Budget: under 8.5 minutes on an H200, by construction: each step has a time limit and the limits
# add up to 500 s. A step that runs out of time is interrupted (SIGINT, then SIGKILL 15 s later), so
# pytest still prints its failures and the benchmark harness still writes its JSON.
# The microbenchmarks run first without the torch.compile variants (each compiles cold, seconds per
# case), then the conv cases at HierTCN's shapes again with them (and eager: ratios need the baseline in
# the same run), in a step of their own.
# Exit status: non-zero if any step failed or ran out of time.
set -u
cd "$(dirname "$0")/.."
WORK=benchmarks/results/gpu_check
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HIERTCN_BENCH_DEVICE=cuda HIERTCN_BENCH_OUT="$WORK"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $WORK/NAME.log
  local name=$1 limit=$2 rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "!!! $name ran out of time (exit $rc) after $((SECONDS - start)) s; last lines:"
    else
      echo "!!! $name failed (exit $rc) after $((SECONDS - start)) s; last lines:"
    fi
    status=1
  else
    echo "--- $name passed in $((SECONDS - start)) s"
  fi
  tail -n 25 "$WORK/$name.log"
}
finish() {
  echo "=== summary"
  $PY benchmarks/summarize.py "$WORK"/*.json 2>&1 | tee "$WORK/summary.txt"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
    tar czf "$OUT/gpu_check.tgz" -C "$WORK" .
  fi
}
trap finish EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$WORK/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$WORK/gpu.txt"

# Hopper only here: one architecture keeps the build short.
step build 150 env HIERTCN_CUDA=1 HIERTCN_CUDA_ARCHS="${HIERTCN_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .
step info 15 $PY -m hiertcn_fast info
step gpu_tests 100 $PY -m pytest tests -q -m gpu -p no:cacheprovider --durations=15
# (test_triton_compile compiles for sm_90 without a GPU, as CI does, and test_cuda_emulated runs the CUDA kernels
# on the CPU: no use of the device's time.)
step triton_tests 50 $PY -m pytest tests -q -k "triton or cuda" -m "not gpu" -p no:cacheprovider \
  --ignore=tests/test_build.py --ignore=tests/test_triton_compile.py --ignore=tests/test_cuda_emulated.py \
  --durations=10
step benchmarks 90 env HIERTCN_BENCH_COMPILE=0 $PY -m pytest benchmarks -q -p no:cacheprovider \
  --ignore=benchmarks/bench_e2e.py --durations=10
step bench_compiled 45 $PY -m pytest benchmarks/bench_causal_conv.py -q -p no:cacheprovider \
  -k "hiertcn and not long and not step"
step bench_e2e 30 $PY benchmarks/bench_e2e.py --quick --rounds 1 --threads 0 --out "$WORK/bench_e2e.json"
step data_bench 20 $PY benchmarks/bench_data.py --quick
exit $status

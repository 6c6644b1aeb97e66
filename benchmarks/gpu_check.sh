#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton installed, no package registry):
# build the extension in place, run the GPU tests, run the GPU microbenchmarks, print a short table
# last. Logs and JSON go to a work folder (benchmarks/results/gpu_check, a subfolder per benchmark step, so no
# step's JSON replaces another's); when $OUT is set (the device tool, which returns at most 8 files) two files go
# there, refreshed after every step so that a command killed at its limit still returns what it had:
# summary.txt and gpu_check.tgz (every log and JSON).
#
# How to call it (from the development machine, where PyPI works):
#   make gpu-prepare          # once: the recbole wheel (ml-100k lives inside it) into .whl/, which git ignores
#   device run, carry [".whl"], timeout_s 560:
#     HIERTCN_BENCH_COMMIT=<git rev-parse --short HEAD, written out> bash benchmarks/gpu_check.sh
# Without .whl/ (and without recbole on the machine) the two ml-100k steps are skipped and say so.
#
# Budget: a deadline of GPU_CHECK_SECONDS (default 500) from the start, for everything: each step's limit is cut
# to what is left before it (less a margin for the summary), and a step with under 10 s left is skipped. A step
# that runs out of time is interrupted (SIGINT, then SIGKILL 10 s later), so pytest still prints its failures and
# the benchmark harness still writes its JSON.
# The microbenchmarks run first without the torch.compile variants (each compiles cold, seconds per
# case), then the conv cases at HierTCN's shapes again with them (and eager: ratios need the baseline in
# the same run), in a step of their own.
# Exit status: non-zero if any step failed, ran out of time or was skipped.
set -u
cd "$(dirname "$0")/.."
WORK=benchmarks/results/gpu_check
rm -rf "$WORK"
mkdir -p "$WORK"
DEADLINE=${GPU_CHECK_SECONDS:-500}
MARGIN=25  # the summary and the archive at the end
export PYTHONUNBUFFERED=1 HIERTCN_BENCH_DEVICE=cuda
PY=${PYTHON:-python3}
status=0
publish() {  # the logs and JSON so far into $OUT (cheap: no Python)
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar czf "$OUT/gpu_check.tgz.part" -C "$WORK" . && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
  fi
}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $WORK/NAME.log
  local name=$1 limit=$2 rc left
  shift 2
  left=$((DEADLINE - MARGIN - SECONDS))
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "!!! $name skipped: ${left} s left before the deadline (GPU_CHECK_SECONDS=$DEADLINE)"
    status=1
    return
  fi
  echo "=== $name (limit ${limit} s, at ${SECONDS} s)"
  local start=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
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
  publish
}
finish() {
  echo "=== summary (at ${SECONDS} s)"
  timeout -s INT -k 5 20 $PY benchmarks/summarize.py $(find "$WORK" -name '*.json' | sort) 2>&1 | tee "$WORK/summary.txt"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
  fi
  publish
}
trap finish EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$WORK/gpu.txt"
timeout 30 $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$WORK/gpu.txt"
echo "commit ${HIERTCN_BENCH_COMMIT:-(not given)}" | tee -a "$WORK/gpu.txt"

# ml-100k ships inside the recbole wheel, which the machine's image lacks: install the carried wheel (no deps:
# only its data file is read) into a folder of the work tree.
have_ml100k=1
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('recbole') is None)" 2>/dev/null; then
  wheel=$(ls .whl/recbole-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ] && $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$wheel" \
      > "$WORK/recbole.log" 2>&1; then
    export PYTHONPATH="$PWD/$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    have_ml100k=0
    echo "!!! no recbole here and no usable .whl/recbole-*.whl (make gpu-prepare, then carry .whl): the ml-100k" \
         "steps (bench_e2e, data_bench) are skipped" | tee -a "$WORK/gpu.txt"
    status=1
  fi
fi

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
step benchmarks 90 env HIERTCN_BENCH_COMPILE=0 HIERTCN_BENCH_OUT="$WORK/benchmarks" \
  $PY -m pytest benchmarks -q -p no:cacheprovider --ignore=benchmarks/bench_e2e.py --durations=10
step bench_compiled 45 env HIERTCN_BENCH_OUT="$WORK/bench_compiled" \
  $PY -m pytest benchmarks/bench_causal_conv.py -q -p no:cacheprovider -k "hiertcn and not long and not step"
if [ "$have_ml100k" -eq 1 ]; then
  step bench_e2e 30 $PY benchmarks/bench_e2e.py --quick --rounds 1 --threads 0 --out "$WORK/bench_e2e/bench_e2e.json"
  step data_bench 20 env HIERTCN_BENCH_OUT="$WORK/data_bench" $PY benchmarks/bench_data.py --quick
fi
exit $status

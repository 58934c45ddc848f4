#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (DESIGN.md section 7), sized for < 8 minutes
# (every step has its own time limit; they add up to 9.3 minutes (560 s), the device
# tool's 10-minute call limit):
#   1. build with the machine's own torch/nvcc (no package registry there),
#   2. run the CUDA tests of every family (the CPU tests run in CI),
#   3. run compute-sanitizer memcheck on the CUDA tests,
#   4. run the GPU benchmarks against the peers.
# Every step's log goes under $OUT (default: ./gpu_check_out); a summary is printed at
# the end and the exit code is non-zero if any step failed.
# Dry run on a CPU machine: `OUT=/tmp/gpu bash bench/gpu_check.sh` (CUDA steps skip).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

step() {  # step NAME TIMEOUT_SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$SUMMARY"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "    exit $status after $((SECONDS - start)) s (log: $name.log)" | tee -a "$SUMMARY"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY"
  [ "$status" -eq 0 ] || failed=1
  return "$status"
}

step machine 20 bash -c 'nvidia-smi; nvcc --version; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"'
step build 150 env LOWRANK_OPS_CUDA=AUTO CMAKE_BUILD_PARALLEL_LEVEL=16 pip install --no-build-isolation --no-deps -v . || {
  echo "build failed: see $OUT/build.log" | tee -a "$SUMMARY"; exit 1; }
step info 20 python -c "import json, lowrank_ops; print(json.dumps(lowrank_ops.info(), indent=1))"
step tests 120 python -m pytest tests -m cuda -q -ra -p no:cacheprovider
if command -v compute-sanitizer > /dev/null && python -c "import lowrank_ops, sys; sys.exit(0 if lowrank_ops.info()['cuda_available'] else 1)"; then
  # memcheck: out-of-bounds and misaligned accesses in our kernels; fails the check.
  # Compiled graphs, CUDA graphs and gradcheck add minutes under memcheck and no kernel
  # launch that the other tests do not make.
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    python -m pytest tests -m cuda -q -p no:cacheprovider -k "not compile and not graph and not gradcheck"
else
  echo "=== memcheck: skipped (no compute-sanitizer or no usable GPU)" | tee -a "$SUMMARY"
fi
# CUDA cases only (the CPU ones are recorded on the CPU machines), full sizes, a short
# time budget per case so the whole GPU suite fits its limit; the SLTrain strategy
# sweep in it is what sets the CUDA constant of choose_strategy.
step bench 130 env LOWRANK_OPS_BENCH_TIME_BUDGET=0.2 python -m lowrank_ops.cli bench --full --device cuda --no-plot --out "$OUT/bench"

echo "=== done: $([ $failed -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED)" | tee -a "$SUMMARY"
exit $failed

#!/usr/bin/env bash
# One-shot validation on the GPU machine (H100/H200, torch with CUDA, nvcc): in about 8 minutes it
#   1. records the environment (GPU, driver, torch / triton / CUDA versions, date)        -> env.txt
#   2. builds the CUDA extension in place (`pip install --no-build-isolation -e .` keeps the installed
#      torch; the in-place build makes the checkout import it)                             -> build.log
#   3. runs the whole test suite on CUDA                                                   -> tests.log, tests.xml
#   4. runs compute-sanitizer memcheck and racecheck on the step tests                     -> sanitizer_*.log
#   5. runs `pytest benchmarks --benchmark-only`, saving JSON                              -> bench.json, bench.log
# Everything lands under ${OUT:-benchmarks/results}. Each stage has its own time limit (build 200 s, tests
# 150 s, sanitizers 45 + 30 s, benchmarks 120 s: ~9 min at worst, ~6 min typically); a failing stage is
# recorded in summary.txt and the script goes on, exiting non-zero at the end if anything failed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
start=$(date +%s)

stage() {  # stage NAME LIMIT_SECONDS LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s) =="
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "ok    $name (${dt}s)" | tee -a "$SUMMARY"
  else
    [ $rc -eq 124 ] && echo "      $name timed out after ${limit}s" | tee -a "$SUMMARY"
    echo "FAIL  $name (rc=$rc, ${dt}s, see $(basename "$log"))" | tee -a "$SUMMARY"
    tail -n 25 "$log"
    status=1
  fi
  return $rc
}

# 1. environment ------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("gpu: none visible to torch")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. build ------------------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-8}
arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || true)
[ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"  # build for this GPU only: halves compile time
stage "build (pip install --no-build-isolation -e . + build_ext --inplace)" 200 "$OUT/build.log" \
  bash -c "'$PY' -m pip install --no-build-isolation --no-deps -e . && '$PY' setup.py build_ext --inplace" \
  || { echo "build failed: nothing else can run" | tee -a "$SUMMARY"; exit 1; }
grep -h "^ddim_fast: building" "$OUT/build.log" | tee -a "$SUMMARY"
"$PY" -c "import torch, ddim_fast.ops as o; assert o.has_native_kernel('cuda'), 'no CUDA kernel registered'" \
  2>&1 | tee -a "$SUMMARY" || status=1

# 3. tests on CUDA -----------------------------------------------------------------------------------
stage "pytest tests (CUDA)" 150 "$OUT/tests.log" \
  "$PY" -m pytest tests -q -p no:cacheprovider -rs --durations=15 --junitxml="$OUT/tests.xml"
tail -n 3 "$OUT/tests.log" | tee -a "$SUMMARY"

# 4. compute-sanitizer on the step tests (small cases; the >2^31-element case is deselected) ----------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SAN_K="(test_views or test_odd_sizes or test_out_of_range or test_in_place or test_empty) and not 2_pow_31"
if [ -n "$SAN" ]; then
  for tool in memcheck racecheck; do
    # racecheck checks the native CUDA kernel only (it has no shared memory: a quick confirmation), and
    # Triton's JIT under racecheck would not fit the time budget.
    sel="$SAN_K"
    limit=45
    [ "$tool" = racecheck ] && { sel="$SAN_K and native"; limit=30; }
    stage "compute-sanitizer $tool" $limit "$OUT/sanitizer_$tool.log" \
      "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
      "$PY" -m pytest tests/test_ddim_step_cuda.py -q -p no:cacheprovider -x -k "$sel"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -n 3 | tee -a "$SUMMARY"
  done
else
  echo "FAIL  compute-sanitizer not found" | tee -a "$SUMMARY"
  status=1
fi

# 5. benchmarks ----------------------------------------------------------------------------------------
stage "pytest benchmarks --benchmark-only" 120 "$OUT/bench.log" \
  "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,max,rounds
sed -n '/ddim-fast step benchmarks/,$p' "$OUT/bench.log" | head -n 80 >"$OUT/bench_ratios.txt"

echo "total $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
echo "results in $OUT:"; ls -la "$OUT"
exit $status

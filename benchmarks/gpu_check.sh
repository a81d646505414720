#!/usr/bin/env bash
# One-shot validation on a bare GPU machine (H100/H200; torch with CUDA, nvcc, no network), in one call
# of at most ~9 minutes (a global deadline, DDIM_FAST_CHECK_DEADLINE seconds, default 540, caps every
# stage so the results are always packaged before a 10-minute job limit):
#   0. installs .whl/*.whl (diffusers, transformers and their pure-Python deps, carried in by the caller)
#      into /tmp/site with --no-deps and puts it on PYTHONPATH; the installed torch/triton are never touched
#   1. records the environment (GPU, driver, torch / triton / CUDA versions, date)
#   2. builds the extension with `pip install --no-build-isolation --no-deps -e .` (an editable build
#      compiles in place; TORCH_CUDA_ARCH_LIST = this GPU only), falling back to
#      `setup.py build_ext --inplace` if pip cannot do it, and checks the CUDA kernels registered
#   3. runs the whole test suite on CUDA, the GPU kernel tests first (JUnit XML)
#   4. compute-sanitizer memcheck on the step tests and the softmax kernels, racecheck on the softmax
#      block-per-row kernel (the only kernel with shared memory) -- skipped with a message if missing
#   5. `python -m ddim_fast bench` and `python -m ddim_fast profile` with the SD1.5 UNet config (random
#      weights; fp16, 512 px, CFG 7.5, 50 steps), JSON
#   6. `pytest benchmarks --benchmark-only`, JSON
# A failing stage is recorded in summary.txt and the script goes on; it exits non-zero if anything failed.
# $OUT receives at most 7 files (the device tool fetches at most 8): summary.txt, env.txt, logs.tar.gz
# (every log, the JUnit XML, the benchmark tables), bench_pytest.json, bench_e2e.json, profile.json,
# profile_graph.json.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # from anywhere: it cd's to the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d /tmp/ddim_fast_check.XXXXXX)
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
start=$(date +%s)
deadline=$(( start + ${DDIM_FAST_CHECK_DEADLINE:-540} ))

note() { echo "$*" | tee -a "$SUMMARY"; }

package() {  # everything but the JSON results goes into one tarball: the fetch limit is 8 files
  note "total $(( $(date +%s) - start ))s"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null || note "could not write logs.tar.gz"
  rm -rf "$LOGS"
  echo "results in $OUT:"; ls -la "$OUT"
}
trap package EXIT

stage() {  # stage NAME LIMIT_SECONDS LOGFILE COMMAND...  (the limit is cut to what the deadline leaves)
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( deadline - $(date +%s) - 10 ))
  if [ "$left" -lt 15 ]; then
    note "SKIP  $name (global deadline reached)"
    status=1
    return 124
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s) =="
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    note "ok    $name (${dt}s)"
  else
    [ $rc -eq 124 ] && note "      $name timed out after ${limit}s"
    note "FAIL  $name (rc=$rc, ${dt}s, see logs.tar.gz:$(basename "$log"))"
    tail -n 25 "$log"
    status=1
  fi
  return $rc
}

# 0. carried wheels -----------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  # --no-deps --no-index: nothing is resolved or downloaded, the installed torch/triton stay as they are.
  # All at once first; if one wheel does not fit this Python, install the others one by one.
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target /tmp/site \
      .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
    for w in .whl/*.whl; do
      "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target /tmp/site "$w" >>"$LOGS/wheels.log" 2>&1 || note "wheel not installed: $(basename "$w")"
    done
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  note "wheels: $(ls .whl/*.whl | wc -l) in .whl/, installed into /tmp/site (on PYTHONPATH; see wheels.log)"
else
  note "wheels: no .whl/ folder (tests needing diffusers/transformers will skip)"
fi

# 1. environment ------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1) | tail -n 2
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for name in ("triton", "numpy", "diffusers", "transformers", "pytest", "pytest_benchmark"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("gpu: none visible to torch")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -E "^(torch|triton|gpu) " "$OUT/env.txt" >>"$SUMMARY"

# 2. build ------------------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || true)
[ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"  # this GPU only: half the nvcc time
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null && export CUDA_HOME=/usr/local/cuda
# The editable install builds the extension in place (setuptools' editable_mode); --no-deps keeps pip's
# resolver away from torch and triton, --no-index keeps it offline.
stage "build: pip install --no-build-isolation --no-deps -e ." 240 "$LOGS/build.log" \
  "$PY" -m pip install -v --disable-pip-version-check --no-index --no-build-isolation --no-deps -e .
if ! compgen -G "ddim_fast/_C*.so" >/dev/null; then
  stage "build: setup.py build_ext --inplace (fallback)" 240 "$LOGS/build_ext.log" "$PY" setup.py build_ext --inplace \
    || { note "build failed: nothing else can run"; exit 1; }
fi
grep -h "ddim_fast: building" "$LOGS"/build*.log | sort -u | tee -a "$SUMMARY"
if registered=$("$PY" -c "import ddim_fast.ops as o; assert o.has_native_kernel('cuda'), 'no CUDA ddim_step kernel'; \
assert o.has_native_kernel('cuda', 'scaled_masked_softmax'), 'no CUDA softmax kernel'" 2>&1); then
  note "ok    CUDA kernels registered (ddim_step, scaled_masked_softmax)"
else
  note "FAIL  CUDA kernels not registered: $(echo "$registered" | tail -n 1)"
  status=1
fi

# 3. tests on CUDA: the GPU kernel tests first (they matter most if time runs short), then the rest ------
GPU_TESTS="tests/test_ddim_step_cuda.py tests/test_graph_safety.py tests/test_attention_ops.py tests/test_ddim_step_triton.py tests/test_sampler_ldm.py tests/test_scheduler_diffusers.py tests/test_pipeline_diffusers.py"
stage "pytest GPU kernel tests (CUDA)" 200 "$LOGS/tests_gpu.log" \
  "$PY" -m pytest $GPU_TESTS -q -p no:cacheprovider -rs --durations=25 --junitxml="$LOGS/tests_gpu.xml"
tail -n 3 "$LOGS/tests_gpu.log" | tee -a "$SUMMARY"
stage "pytest other tests (CUDA)" 180 "$LOGS/tests_rest.log" \
  "$PY" -m pytest tests -q -p no:cacheprovider -rs --durations=25 --junitxml="$LOGS/tests_rest.xml" \
  $(for f in $GPU_TESTS; do printf -- "--ignore=%s " "$f"; done)
tail -n 3 "$LOGS/tests_rest.log" | tee -a "$SUMMARY"

# 4. compute-sanitizer ---------------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
      /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$SAN" ]; then
  # Small cases only (the >2^31-element test is deselected); Triton compiles on the host, unaffected.
  STEP_K="(test_views or test_odd_sizes or test_out_of_range or test_in_place or test_empty) and not 2_pow_31"
  stage "compute-sanitizer memcheck (step)" 75 "$LOGS/sanitizer_memcheck_step.log" \
    "$SAN" --tool memcheck --error-exitcode 99 --target-processes all \
    "$PY" -m pytest tests/test_ddim_step_cuda.py -q -p no:cacheprovider -x -k "$STEP_K"
  grep -E "ERROR SUMMARY|passed|failed" "$LOGS/sanitizer_memcheck_step.log" | tail -n 2 | tee -a "$SUMMARY"
  # The softmax kernels directly: warp-per-row (short rows, broadcast bool mask, additive mask) and the
  # block-per-row kernel (shared memory + __syncthreads: racecheck), in place too, every dtype.
  cat >"$LOGS/softmax_san.py" <<'EOF'
import torch
import ddim_fast.ops  # noqa: F401  (loads the extension)
op, op_ = torch.ops.ddim_fast.scaled_masked_softmax, torch.ops.ddim_fast.scaled_masked_softmax_
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in ((2, 3, 5, 77), (3, 7, 1), (2, 2, 3, 1300), (5, 4097)):
        s = torch.randn(shape, device="cuda").to(dtype)
        keep = torch.rand(shape[:-2] + (1, shape[-1]), device="cuda") > 0.3
        add = torch.randn(shape, device="cuda").to(dtype)
        for mask in (None, keep, add):
            out = op(s, mask, 0.5)
            inplace = s.clone()
            op_(inplace, mask, 0.5)
            assert torch.equal(out, inplace), (dtype, shape)
torch.cuda.synchronize()
print("softmax sanitizer run: ok")
EOF
  for tool in memcheck racecheck; do
    stage "compute-sanitizer $tool (softmax)" 60 "$LOGS/sanitizer_${tool}_softmax.log" \
      env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      "$SAN" --tool "$tool" --error-exitcode 99 "$PY" "$LOGS/softmax_san.py"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|ok$" "$LOGS/sanitizer_${tool}_softmax.log" | tail -n 2 | tee -a "$SUMMARY"
  done
else
  note "SKIP  compute-sanitizer: not on PATH nor under \$CUDA_HOME/bin or /usr/local/cuda*/bin"
fi

# 5. end-to-end: SD1.5 UNet config, fp16, 512 px, CFG 7.5, 50 steps -----------------------------------
SD15="--model sd15-unet --dtype fp16 --resolution 512 --guidance 7.5 --steps 50"
stage "python -m ddim_fast bench (sd15, fp16, 512)" 120 "$LOGS/bench_e2e.log" \
  "$PY" -m ddim_fast bench $SD15 --batch 1 --json "$OUT/bench_e2e.json"
stage "python -m ddim_fast profile (sd15, fp16, 512)" 60 "$LOGS/profile.log" \
  "$PY" -m ddim_fast profile $SD15 --batch 1 --json "$OUT/profile.json"
stage "python -m ddim_fast profile --cuda-graph (sd15, fp16, 512)" 60 "$LOGS/profile_graph.log" \
  "$PY" -m ddim_fast profile $SD15 --batch 1 --cuda-graph --json "$OUT/profile_graph.json"

# 6. pytest-benchmark suites ---------------------------------------------------------------------------
stage "pytest benchmarks --benchmark-only" 150 "$LOGS/bench_pytest.log" \
  "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_pytest.json" --benchmark-columns=min,median,max,rounds
sed -n '/ddim-fast step benchmarks/,$p' "$LOGS/bench_pytest.log" | head -n 80 >"$LOGS/bench_ratios.txt"

exit $status

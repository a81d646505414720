#!/usr/bin/env bash
# The device check: every GPU number and check this project needs, from ONE call of at most ~8 minutes on a
# bare H100/H200 machine (torch with CUDA, nvcc, no network). Results first: each stage writes its file into
# $OUT as soon as it ends (summary.txt is appended live, logs.tar.gz refreshed after every stage), so a run
# cut short still returns everything finished before the cut.
#
#   stage                                                         cap (s)  writes
#   0  wheels: .whl/*.whl (diffusers only) -> /tmp/site, --no-deps    15  summary.txt
#   1  environment: GPU, driver, torch/triton/CUDA, commit, date      (0)  env.txt
#   2  build for this GPU's arch only (TORCH_CUDA_ARCH_LIST) with     120  logs.tar.gz:build.log
#      scripts/native_toolchain.py (self-check, one fallback compiler)
#   2b native self-check: every op with bad input must raise the       60  logs.tar.gz:native_selfcheck.json
#      documented Python exception, no signal (scripts/native_selfcheck.py --device all, when present)
#   3  micro-benchmark (benchmarks/gpu_micro.py: step, attention,     100  micro.json
#      autocast graph; ~90 s)
#   4a python -m ddim_fast bench: SD1.5 UNet, fp16, 512 px, CFG 7.5,  100  bench_e2e.json
#      50 steps: diffusers, fast, fast+graph, fast+attn (proven)
#   4b python -m ddim_fast generate, 1 GPU (when the command exists)   20  generate.json
#   5  the CUDA tests, pytest -n 16 --cuda-only --isolate (a test     150  tests.xml (JUnit)
#      that may crash runs in a child process of its own), per-test timeout, plugin autoload off,
#      one shared Triton cache, 1 CPU thread per worker; timeout --signal=INT (pytest still writes
#      its JUnit XML)
#   6  compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1)  3x60  logs.tar.gz:sanitizer_*.log
#      on the native step tests and the softmax kernels, racecheck
#      on the softmax block kernel (small shapes); runs BESIDE stage 5 (both functional: nothing is timed then)
#   7  pipeline: benchmarks/bench_pipeline.py, SD1.5 512 px batch 1  240  bench_pipeline.json (entries written
#      (fp16, CFG 7.5, 50 steps): plain, optimize, compile-reduce-         as they finish: a cut keeps them)
#      overhead, diffusers-recipe, optimize-no-attention, optimize-no-graph, optimize-no-channels-last,
#      optimize-unet-body, in that order; after the tests and the sanitizer: nothing else uses the GPU while
#      it times
#   8  breakdown: python -m ddim_fast bench --breakdown, SD1.5 UNet    90  logs.tar.gz:breakdown.json, table
#      fp16 batch 1 (CFG batch 2): one graphed step of plain,                  in summary.txt
#      channels-last, optimize, compile-reduce-overhead, optimize-unet-body by kind of kernel (its compile reuses the Inductor
#      caches stage 7 left)
#   Not in the default run (their compiles do not fit beside the rest), each one call of its own:
#   STAGES=pipeline2: SD1.5 512 px batch 1 compile-default and        420  bench_pipeline2.json
#      optimize-compile, and every variant at batch 4
#   STAGES=pipeline3: SDXL 1024 px batch 1 (UNet config, random       420  bench_pipeline3.json
#      weights), every variant
#   caps, serial: 15 + 120 + 60 + 100 + 100 + 20 + 150 + 240 + 90 = 895 s > the 470 s deadline on purpose.
#   Measured on the H200 (2026-12-04): wheels 1, env ~5, build 18, micro ~40-90, bench 56, generate 5 s;
#   expected (not measured yet): tests ~60-90 s, pipeline ~170 s (two compiles of ~50 s each), breakdown ~40 s.
# A global deadline (DDIM_FAST_CHECK_DEADLINE, default 470 s from the start) cuts every cap to what is left
# (10 s are kept for the last packaging); a stage with under 10 s left is skipped and named in summary.txt.
# The stages before the tests hold the tests' cap back (HOLD): they end by 470 - 10 - 150 = 310 s, so the
# tests always get their whole 150 s (expected ~60-90 s: 16 workers, no crashes); the pipeline stage holds 45 s
# for the breakdown. The pipeline stage runs its rows in the order above (the parts last) and writes each as it
# ends: what it finishes before its cut is in bench_pipeline.json either way.
# $OUT receives at most 8 files, flat: summary.txt env.txt micro.json bench_e2e.json bench_pipeline.json
# generate.json tests.xml logs.tar.gz (bench_pipeline2.json / bench_pipeline3.json in their own runs). The
# script exits non-zero when a stage failed.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                 # on the GPU machine (see benchmarks/results/README.md)
#   OUT=/some/dir STAGES=pipeline2 bash benchmarks/gpu_check.sh   # a later call: the rows the default run leaves
#   DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_check.sh          # on a CPU: the same stages, order, deadlines,
#                                                              # packaging and file names, with quick CPU stand-ins
# STAGES=micro,bench (any of micro bench generate tests sanitizer pipeline breakdown pipeline2 pipeline3) runs only
# those after the build.
# Dry-run knobs (for tests): CAP_<stage>=S overrides a stage's cap (stages: wheels build micro bench pipeline
# breakdown pipeline2 pipeline3 generate tests sanitizer); DRY_RUN_SLOW=<stage> makes that stage's stand-in hang
# (it must be cut at its cap).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/ddim_fast_check.XXXXXX")
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
start=$(date +%s)
deadline=$(( start + ${DDIM_FAST_CHECK_DEADLINE:-470} ))
RESERVE=10
MIN_STAGE=10
HOLD=0  # seconds the running stage leaves to later stages (the tests' cap while stages before them run)
HOLD_FOR="the tests"
MAX_FILES=8
EXPECTED_FILES="summary.txt env.txt micro.json bench_e2e.json bench_pipeline.json bench_pipeline2.json bench_pipeline3.json generate.json tests.xml logs.tar.gz"
export PYTHONUNBUFFERED=1
# One Triton cache for every stage and process (micro, tests, their isolated children, sanitizer): a kernel
# specialization compiled once on this machine loads from disk everywhere else.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/ddim_fast_triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - start )); }
cap() { local var="CAP_$1"; echo "${!var:-$2}"; }  # cap STAGE DEFAULT (CAP_<stage> overrides, for tests)
# STAGES=micro,bench,...: run only these of micro bench generate tests sanitizer pipeline breakdown pipeline2
# pipeline3 (wheels, env and build always run: a fresh machine needs them). Default: all but pipeline2 and
# pipeline3 (OPT_IN: each is a device run of its own).
OPT_IN=" pipeline2 pipeline3 "
wanted() {  # silent
  if [ -z "${STAGES:-}" ]; then
    case "$OPT_IN" in *" $1 "*) return 1 ;; esac
    return 0
  fi
  case ",$STAGES," in *",$1,"*) return 0 ;; esac
  return 1
}
want() { wanted "$1" && return 0; [ -n "${STAGES:-}" ] && note "SKIP  $1 (not in STAGES=$STAGES)"; return 1; }

pack() {  # every log into one tarball (the fetch limit is 8 files); refreshed after each stage
  local tmp="$LOGS.pack.$BASHPID.tgz"  # outside $OUT and per process: the sanitizer job packs too
  tar -czf "$tmp" -C "$LOGS" . 2>/dev/null && mv -f "$tmp" "$OUT/logs.tar.gz"
  rm -f "$tmp"
}

check_out() {  # what comes back: at most 8 plain files, flat, names the device tool accepts
  local n bad
  n=$(find "$OUT" -mindepth 1 | wc -l)
  bad=$(find "$OUT" -mindepth 1 \( ! -type f -o ! -name '*' \) -printf '%f\n'; \
        find "$OUT" -mindepth 1 -type f -printf '%f\n' | grep -Ev '^[A-Za-z0-9._-]+$')
  [ "$n" -le "$MAX_FILES" ] || { note "FAIL  \$OUT holds $n entries (at most $MAX_FILES come back)"; status=1; }
  [ -z "$bad" ] || { note "FAIL  \$OUT entries that would not come back: $(echo $bad)"; status=1; }
  for f in $(find "$OUT" -mindepth 1 -type f -printf '%f\n'); do
    case " $EXPECTED_FILES " in *" $f "*) ;; *) note "FAIL  unexpected file in \$OUT: $f"; status=1 ;; esac
  done
}

finish() {
  note "total $(elapsed)s (deadline ${DDIM_FAST_CHECK_DEADLINE:-470}s), exit status $status"
  cp "$SUMMARY" "$LOGS/summary.txt" 2>/dev/null
  pack
  check_out
  rm -rf "$LOGS" "$LOGS".pack.*
  echo "results in $OUT:"; ls -la "$OUT"
}
trap finish EXIT

# stage NAME CAP LOGFILE [--signal SIG] COMMAND...: run with min(CAP, time left before the deadline); the
# outcome, duration and log name go to summary.txt; logs.tar.gz is refreshed. Returns the command's status.
stage() {
  local name=$1 limit=$2 log=$3 sig=TERM
  shift 3
  if [ "${1:-}" = "--signal" ]; then sig=$2; shift 2; fi
  local left=$(( deadline - $(date +%s) - RESERVE - HOLD ))
  if [ "$left" -lt "$MIN_STAGE" ]; then
    note "SKIP  $name (global deadline: ${left}s left$([ "$HOLD" -gt 0 ] && echo " after the ${HOLD}s held for $HOLD_FOR"))"
    status=1
    return 124
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s, at $(elapsed)s) =="
  timeout --signal="$sig" --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    note "ok    $name (${dt}s)"
  else
    [ $rc -eq 124 ] && note "      $name cut at its limit of ${limit}s"
    note "FAIL  $name (rc=$rc, ${dt}s, see logs.tar.gz:$(basename "$log"))"
    tail -n 25 "$log"
    status=1
  fi
  pack
  return $rc
}

# A stand-in that hangs, for the dry run's timeout tests.
slow_or() { if [ "${DRY_RUN_SLOW:-}" = "$1" ]; then shift; echo "dry run: hanging"; exec sleep 100000; fi; shift; exec "$@"; }
export -f slow_or 2>/dev/null

run_stage() {  # run_stage STAGE-KEY NAME DEFAULT-CAP LOG [--signal SIG] COMMAND...  (the dry-run hang hook)
  local key=$1 name=$2 limit; limit=$(cap "$1" "$3"); local log=$4
  shift 4
  local sigargs=()
  if [ "${1:-}" = "--signal" ]; then sigargs=(--signal "$2"); shift 2; fi
  stage "$name" "$limit" "$log" "${sigargs[@]}" bash -c 'slow_or "$@"' _ "$key" "$@"
}

[ "$DRY_RUN" = "1" ] && note "DRY RUN on $(hostname): CPU stand-ins for the GPU commands (see the script's header)"
note "plan (cap s): wheels 15, build 120, selfcheck 60, micro 100, bench 100, generate 20, tests 150 (held back; sanitizer 3x60 beside it), pipeline 240 (45 held for the breakdown), breakdown 90; not by default: pipeline2 420, pipeline3 420 (STAGES=); deadline ${DDIM_FAST_CHECK_DEADLINE:-470}s"
# The stages before the tests leave the tests' cap untouched (when the tests run at all).
if [ -z "${STAGES:-}" ] || [[ ",$STAGES," == *",tests,"* ]]; then HOLD=$(cap tests 150); fi

# 0. carried wheels (diffusers only: the image has transformers, huggingface_hub, safetensors, Pillow) -------
if compgen -G ".whl/*.whl" >/dev/null; then
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      diffusers-*) ;;
      *) note "WARN  carried wheel $(basename "$w") would shadow the image's own package: carry diffusers only" ;;
    esac
  done
  if [ "$DRY_RUN" = "1" ]; then
    note "dry run: would install $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site (--no-deps --no-index)"
  else
    run_stage wheels "wheels: install .whl/*.whl into /tmp/site" 15 "$LOGS/wheels.log" \
      "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the checkout: the image's packages are never shadowed
  fi
else
  note "wheels: no .whl/ folder (diffusers missing: the bench and diffusers tests skip; see benchmarks/results/README.md)"
fi

# 1. environment ------------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
  echo "dry_run: $DRY_RUN"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi: not available"
  (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1) | tail -n 2
  uname -r
  "$PY" - <<'EOF'
import importlib.metadata as metadata, os, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
# Versions from the installed metadata, not imports: importing diffusers and transformers takes seconds.
for name, dist in (("triton", "triton"), ("numpy", "numpy"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                   ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("xdist", "pytest-xdist"),
                   ("pytest_timeout", "pytest-timeout")):
    try:
        print(name, metadata.version(dist))
    except Exception as exc:
        print(name, "unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("gpu: none visible to torch")
print("cpus", os.cpu_count())
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -E "^(git:|torch|triton|gpu|diffusers) " "$OUT/env.txt" >>"$SUMMARY"
cp "$OUT/env.txt" "$LOGS/env.txt"

# 2. build for this GPU's arch only -----------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "$DRY_RUN" = "1" ]; then
  run_stage build "build (dry run: the extension already built here must import)" 120 "$LOGS/build.log" \
    "$PY" -c "import ddim_fast, ddim_fast._C as c; print('dry run: would run TORCH_CUDA_ARCH_LIST=<this GPU> setup.py build_ext --inplace; loaded', c.__file__)"
else
  arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || true)
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"
  [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ] && export CUDA_HOME=/usr/local/cuda
  note "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS"
  # scripts/native_toolchain.py: setup.py build_ext --inplace, then the native self-check; when the extension
  # built by the image's compiler cannot raise its errors (the 2026-12-04 segfaults), one rebuild with a fallback
  # compiler (docs/design.md, Build). setup.py's own output lands in build/build.log, copied into the logs.
  run_stage build "build: native_toolchain.py build (sm_${arch/./}, self-check, fallback compiler)" 120 \
    "$LOGS/build.log" "$PY" scripts/native_toolchain.py build --device all \
    --selfcheck-json "$LOGS/native_selfcheck_build.json" \
    || { cp build/build.log "$LOGS/setup_build.log" 2>/dev/null; note "build failed: nothing else can run"; exit 1; }
  cp build/build.log "$LOGS/setup_build.log" 2>/dev/null
  grep -hE "ddim_fast: building|self-check|fallback|built by" "$LOGS/build.log" "$LOGS/setup_build.log" 2>/dev/null \
    | sort -u | tee -a "$SUMMARY"
fi
if registered=$("$PY" -c "
import ddim_fast.ops as o, torch
want = 'cuda' if torch.cuda.is_available() else 'cpu'
missing = [op for op in ('ddim_step', 'ddim_step_out', 'scaled_masked_softmax', 'scaled_masked_softmax_') if not o.has_native_kernel(want, op)]
assert not missing, f'no {want} kernel for {missing}'
print(want)" 2>&1); then
  note "ok    native kernels registered on $(echo "$registered" | tail -n 1) (ddim_step, ddim_step_out, softmax, softmax_)"
else
  note "FAIL  native kernels not registered: $(echo "$registered" | tail -n 1)"
  status=1
fi

# 2b. native self-check: every op called with bad input, each case in a child process, must raise the
# documented Python exception (on the first H200 image every C++ error segfaulted the process, issue 17).
if [ -f scripts/native_selfcheck.py ]; then
  if [ "$DRY_RUN" = "1" ]; then SELFCHECK_DEVICE=cpu; else SELFCHECK_DEVICE=all; fi
  run_stage selfcheck "native self-check (scripts/native_selfcheck.py --device $SELFCHECK_DEVICE)" 60 \
    "$LOGS/native_selfcheck.log" "$PY" scripts/native_selfcheck.py --device "$SELFCHECK_DEVICE" \
    --json "$LOGS/native_selfcheck.json"
  grep -v '^\s*$' "$LOGS/native_selfcheck.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"
else
  note "SKIP  native self-check: scripts/native_selfcheck.py is not in this checkout"
fi

# 3. micro-benchmark --------------------------------------------------------------------------------------
if ! want micro; then :
elif [ "$DRY_RUN" = "1" ]; then
  run_stage micro "micro-benchmark (dry run: gpu_micro.py on CPU, tiny shapes, no compile)" 100 "$LOGS/micro.log" \
    "$PY" benchmarks/gpu_micro.py --device cpu --skip compile --repeats 1 --budget 20 --json "$OUT/micro.json"
else
  run_stage micro "micro-benchmark (gpu_micro.py)" 100 "$LOGS/micro.log" \
    "$PY" benchmarks/gpu_micro.py --budget 85 --json "$OUT/micro.json"
fi
sed -n '/^gpu_micro on/,$p' "$LOGS/micro.log" | grep -E "^(copy ceiling|goal|ERROR|sections)" | tee -a "$SUMMARY"

# 4a. the end-to-end bench --------------------------------------------------------------------------------
# On the CPU stand-ins one torch thread: two cores shared with other jobs make OpenMP's spinning threads 10-30x
# slower than one thread.
CPU_THREADS=
[ "$DRY_RUN" = "1" ] && CPU_THREADS="--threads 1"
if [ "$DRY_RUN" = "1" ]; then
  BENCH_ARGS="--model tiny-unet --dtype fp32 --guidance 7.5 --steps 2 --batch 1 --repeats 1 --device cpu"
else
  BENCH_ARGS="--model sd15-unet --dtype fp16 --resolution 512 --guidance 7.5 --steps 50 --batch 1 --repeats 2"
fi
want bench && run_stage bench "python -m ddim_fast bench $BENCH_ARGS" 100 "$LOGS/bench_e2e.log" \
  "$PY" -m ddim_fast --no-progress $CPU_THREADS bench $BENCH_ARGS --json "$OUT/bench_e2e.json"
[ -f "$LOGS/bench_e2e.log" ] && grep -E "^(bench:|UNet alone|loop |diffusers |fast|agreement)" "$LOGS/bench_e2e.log" | tee -a "$SUMMARY"

# 4b. generate on one GPU ---------------------------------------------------------------------------------
if ! want generate; then :
elif "$PY" -m ddim_fast generate --help >/dev/null 2>&1; then
  if [ "$DRY_RUN" = "1" ]; then
    GEN_ARGS="--model embedded --num-samples 4 --batch-size 2 --steps 2 --device cpu"
  else
    GEN_ARGS="--model embedded --num-samples 512 --batch-size 128 --steps 50 --device cuda"
  fi
  run_stage generate "python -m ddim_fast generate $GEN_ARGS" 20 "$LOGS/generate.log" \
    "$PY" -m ddim_fast --no-progress generate --out "$LOGS/generate_out" $GEN_ARGS --json "$OUT/generate.json"
  tail -n 2 "$LOGS/generate.log" | tee -a "$SUMMARY"
  rm -rf "$LOGS/generate_out"  # the images themselves do not come back
else
  note "SKIP  generate: \`python -m ddim_fast generate --help\` fails in this checkout"
fi

# 5 + 6. CUDA tests and, beside them, compute-sanitizer ---------------------------------------------------
CUDA_FILES="tests/test_ddim_step_cuda.py,tests/test_ddim_step_triton.py,tests/test_attention_ops.py,tests/test_graph_safety.py,tests/test_graph_autocast.py"
MIXED_FILES="tests/test_sampler_ldm.py tests/test_scheduler_diffusers.py tests/test_pipeline_diffusers.py tests/test_cli.py"
[ -f tests/test_optimize_pipeline.py ] && MIXED_FILES="$MIXED_FILES tests/test_optimize_pipeline.py"
# --isolate: a test that may kill its process (marked `isolate`, or using pytest.raises: the error paths) runs
# in a child process of its own, so a crash fails that test by name and never takes down an xdist worker
# (a restart costs 10-20 s of imports; run 1 lost 24 workers that way). Plugin autoload off: the image's
# pytest plugins (pytest-benchmark, ...) load in every worker and child otherwise; the ones used are named.
# --tb=short: the JUnit file keeps each failure's text, the log stays small.
TEST_FLAGS=(-q -p no:cacheprovider -p pytest_gpu_check -rfE --tb=short --junitxml="$OUT/tests.xml" --cuda-only
            --cuda-files="$CUDA_FILES" --isolate)
CPUS=$(nproc 2>/dev/null || echo 2)
TEST_WORKERS=${TEST_WORKERS:-$(( CPUS < 16 ? CPUS : 16 ))}
if "$PY" -c "import xdist" 2>/dev/null; then
  # --dist worksteal: each worker starts on its own contiguous share and an idle worker takes half of a busy
  # one's queue, so runs of slow tests (the 46 isolated ones, 30 of them consecutive; torch.compile) spread out;
  # a crashed worker's queue goes back to the others.
  TEST_FLAGS+=(-p xdist.plugin -n "$TEST_WORKERS" --dist worksteal)
  TEST_MODE="-n $TEST_WORKERS"
else
  note "tests: pytest-xdist missing, running serially"
  TEST_MODE="serial"
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TEST_FLAGS+=(-p pytest_timeout --timeout=60 --timeout-method=signal)
else
  TEST_FLAGS+=(--per-test-timeout=60)
fi
if [ "$DRY_RUN" = "1" ]; then
  # The same pytest command line on two quick CPU files (what --cuda-only keeps here: their CUDA tests skip).
  TEST_TARGETS="tests/test_graph_autocast.py tests/test_schedule.py"
  TEST_FLAGS+=(--cuda-files=tests/test_graph_autocast.py)
else
  TEST_TARGETS="${CUDA_FILES//,/ } $MIXED_FILES"
fi
export PYTHONPATH="$ROOT/benchmarks:$PYTHONPATH"  # the pytest_gpu_check plugin

SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
      /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
STEP_K="(test_views or test_odd_sizes or test_out_of_range or test_in_place or test_empty) and native and not 2_pow_31"
sanitize() {  # sanitize TOOL NAME LOG COMMAND...: compute-sanitizer around COMMAND, the caching allocator off
  local tool=$1 name=$2 log=$3 rc=0
  shift 3
  if [ "$DRY_RUN" = "1" ]; then
    run_stage sanitizer "$name (dry run: the command without compute-sanitizer, on CPU)" 60 "$log" "$@" || rc=$?
  elif [ -z "$SAN" ]; then
    note "SKIP  $name: compute-sanitizer not on PATH nor under \$CUDA_HOME/bin or /usr/local/cuda*/bin"
    return 0
  else
    run_stage sanitizer "$name" 60 "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all "$@" || rc=$?
    if grep -q "Device not supported" "$log"; then
      note "      $name: compute-sanitizer does not support this machine's runtime (gVisor?): not a kernel failure"
    fi
  fi
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|: ok$" "$log" | tail -n 2 | tee -a "$SUMMARY"
  return $rc
}
sanitizers() {  # stage 6, in the background beside the tests (functional checks: nothing is timed then)
  local rc=0 device_args=()
  [ "$DRY_RUN" = "1" ] && device_args=(--device cpu)
  sanitize memcheck "memcheck (native step tests)" "$LOGS/sanitizer_memcheck_step.log" \
    "$PY" -m pytest tests/test_ddim_step_cuda.py -q -p no:cacheprovider -x -k "$STEP_K" || rc=1
  sanitize memcheck "memcheck (softmax kernels)" "$LOGS/sanitizer_memcheck_softmax.log" \
    "$PY" benchmarks/sanitizer_softmax.py "${device_args[@]}" || rc=1
  sanitize racecheck "racecheck (softmax block kernel)" "$LOGS/sanitizer_racecheck_softmax.log" \
    "$PY" benchmarks/sanitizer_softmax.py "${device_args[@]}" || rc=1
  return $rc
}
sanitizers_pid=
if want sanitizer; then
  HOLD=0
  sanitizers &
  sanitizers_pid=$!
fi

# The tests in the foreground: a background job would start pytest with SIGINT ignored, and timeout's INT
# (which lets pytest write its JUnit XML) would then do nothing.
if want tests; then
  HOLD=0
  # 1 CPU thread per worker: 16 workers x 16 OpenMP threads each would oversubscribe the CPU tests 16-fold;
  # likewise Inductor compiles in the worker (no pool of 16 compile processes per worker for a few kernels).
  run_stage tests "pytest the CUDA tests ($TEST_MODE, --isolate, per-test timeout, JUnit)" 150 \
    "$LOGS/tests.log" --signal INT env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" -m pytest $TEST_TARGETS "${TEST_FLAGS[@]}" || status=1
  grep -E "passed|failed|error" "$LOGS/tests.log" | tail -n 1 | tee -a "$SUMMARY"
  grep -E "^(FAILED|ERROR) " "$LOGS/tests.log" | head -n 30 | tee -a "$SUMMARY"
  # Counts, crashes (xdist's "crashed while running", isolated children killed by a signal), the slowest tests
  if [ -f "$OUT/tests.xml" ]; then
    selected=$(grep -oE "pytest_gpu_check: [0-9]+ tests selected" "$LOGS/tests.log" | head -n 1 | grep -oE "[0-9]+")
    "$PY" benchmarks/pytest_gpu_check.py "$OUT/tests.xml" "$selected" 2>&1 | tee -a "$SUMMARY"
  fi
  note "tests: $(grep -c 'node down' "$LOGS/tests.log" 2>/dev/null) xdist workers went down; Triton cache: $(find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l) compiled kernels in $TRITON_CACHE_DIR"
fi
[ -n "$sanitizers_pid" ] && { wait "$sanitizers_pid" || status=1; }
sanitizers_pid=

# 7. the pipeline table: pipe(...) in every variant, proven, timed, one table (benchmarks/bench_pipeline.py) ------
# After the tests and the sanitizer, so that nothing else runs on the GPU or the CPUs while it times. Each entry is
# written to its JSON file as it finishes (DDIM_FAST_PIPELINE_JSON): a stage cut by the deadline keeps them.
PIPELINE_K="cuda and sd15-b1 and not compile-default and not optimize-compile"
PIPELINE2_K="cuda and ((sd15-b1 and (compile-default or optimize-compile)) or sd15-b4)"
PIPELINE3_K="cuda and sdxl-b1"
pipeline_stage() {  # pipeline_stage KEY CAP OUTFILE -K-EXPRESSION WHAT
  local key=$1 limit=$2 file=$3 expr=$4 what=$5
  if [ "$DRY_RUN" = "1" ] && [ "$key" = pipeline ]; then
    # The same command on the CPU's tiny pipeline (plain only: seconds), its results file written as it ends.
    run_stage "$key" "$key: bench_pipeline.py $what (dry run: tiny CPU pipeline, plain only)" \
      "$limit" "$LOGS/bench_$key.log" env CI=1 DDIM_FAST_PIPELINE_JSON="$OUT/$file" "$PY" -m pytest \
      benchmarks/bench_pipeline.py -k "cpu_tiny and plain" --benchmark-only -q \
      -p no:cacheprovider -rfEs --benchmark-json="$LOGS/${key}_pytest.json"
  elif [ "$DRY_RUN" = "1" ]; then
    run_stage "$key" "$key: bench_pipeline.py $what (dry run: collection only)" "$limit" "$LOGS/bench_$key.log" \
      "$PY" -m pytest benchmarks/bench_pipeline.py -k "$expr" --collect-only -q -p no:cacheprovider
  else
    run_stage "$key" "$key: bench_pipeline.py $what" "$limit" "$LOGS/bench_$key.log" \
      env DDIM_FAST_PIPELINE_JSON="$OUT/$file" "$PY" -m pytest benchmarks/bench_pipeline.py -k "$expr" \
      --benchmark-only -q -p no:cacheprovider -rfEs --benchmark-json="$LOGS/${key}_pytest.json"
  fi
  local rc=$?
  sed -n '/ddim-fast pipeline benchmarks/,/^---/p' "$LOGS/bench_$key.log" | grep -vE "^(-|=)" | head -n 40 \
    | tee -a "$SUMMARY"
  grep -E "^(FAILED|ERROR|SKIPPED) " "$LOGS/bench_$key.log" | head -n 12 | tee -a "$SUMMARY"
  tail -n 1 "$LOGS/bench_$key.log" | tee -a "$SUMMARY"
  return $rc
}
if want pipeline; then
  wanted breakdown && { HOLD=$(cap breakdown_hold 45); HOLD_FOR="the breakdown"; }
  pipeline_stage pipeline 240 bench_pipeline.json "$PIPELINE_K" "SD1.5 512 px batch 1" || status=1
  HOLD=0
fi

# 8. where a UNet step's time goes, by kind of kernel (python -m ddim_fast bench --breakdown) -------------------
if want breakdown; then
  if [ "$DRY_RUN" = "1" ]; then
    BREAKDOWN_ARGS="--model tiny-unet --device cpu --breakdown-variants plain,optimize --breakdown-calls 1"
  else
    BREAKDOWN_ARGS="--model sd15-unet --dtype fp16 --batch 1"
  fi
  run_stage breakdown "python -m ddim_fast bench --breakdown $BREAKDOWN_ARGS" 90 "$LOGS/breakdown.log" \
    "$PY" -m ddim_fast --no-progress $CPU_THREADS bench --breakdown $BREAKDOWN_ARGS --json "$LOGS/breakdown.json" \
    || status=1
  sed -n '/^breakdown:/,$p' "$LOGS/breakdown.log" | head -n 24 | tee -a "$SUMMARY"
  pack
fi

# Not in the default run: the other rows of the table, each a device run of its own (STAGES=pipeline2 / pipeline3).
if want pipeline2; then
  pipeline_stage pipeline2 420 bench_pipeline2.json "$PIPELINE2_K" "SD1.5 batch 1 compile-default/optimize-compile, batch 4" \
    || status=1
fi
if want pipeline3; then
  pipeline_stage pipeline3 420 bench_pipeline3.json "$PIPELINE3_K" "SDXL 1024 px batch 1" || status=1
fi
[ -z "${STAGES:-}" ] && note "not in this run: STAGES=pipeline2 (SD1.5 batch 1 compile-default, optimize-compile; batch 4), STAGES=pipeline3 (SDXL 1024 px): a device run each"
exit $status

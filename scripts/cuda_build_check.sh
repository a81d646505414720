#!/usr/bin/env bash
# Builds, links and loads the CUDA extension on a machine without a GPU (DESIGN.md, "Build"), for CI:
#   1. a virtual environment with a CUDA build of torch (DDIM_FAST_CUDA_TORCH, default 2.14.1, which pip
#      takes from this project's machines' local package index), created once and reused: DDIM_FAST_CUDA_VENV,
#      default ${XDG_CACHE_HOME:-~/.cache}/ddim_fast/venv-cuda-torch-<version>, outside the checkout;
#   2. the CUDA toolkit: $CUDA_HOME when it holds include/cuda_runtime.h, else the folder the nvcc on PATH
#      really runs from (asked from `nvcc --dryrun`: the nvcc on PATH may be a wrapper script, and torch's
#      guess from its location is a folder without the headers);
#   3. `setup.py build_ext --inplace` for TORCH_CUDA_ARCH_LIST (default 9.0) on a copy of the sources in a
#      temporary folder: the checkout's CPU ddim_fast/_C*.so (what the tests load) is never touched. No -std
#      flag of ours: every -std=c++NN of the build must be one that torch's cpp_extension of that version
#      chooses itself (read from its source: c++17 for 2.11, c++20 for 2.13+);
#   4. scripts/cuda_build_check.py with the venv's Python on the built copy: import, sm_XX cubins and the
#      step's 16-byte vector path in them, every op's kernels where DESIGN.md says, fake-tensor (CUDA) and meta
#      passes of every op, one CPU call of each C++ kernel against the reference.
# Without nvcc it says so and exits 0 (nothing to build with); DDIM_FAST_SKIP_CUDA_BUILD_CHECK=1 skips it on
# purpose. Any other failure (venv, install, build, import, check) exits 1. Logs: build/cuda_build_check*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TAG="[cuda-build-check]"
start=$(date +%s)

if [ "${DDIM_FAST_SKIP_CUDA_BUILD_CHECK:-0}" = "1" ]; then
  echo "$TAG skipped: DDIM_FAST_SKIP_CUDA_BUILD_CHECK=1"
  exit 0
fi

# --- the toolkit ---------------------------------------------------------------------------------------
toolkit=""
if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  toolkit=$CUDA_HOME
else
  NVCC=${NVCC:-$(command -v nvcc || true)}
  if [ -z "$NVCC" ]; then
    echo "$TAG skipped: no nvcc on PATH and no CUDA_HOME with include/cuda_runtime.h (nothing to build with)"
    exit 0
  fi
  # nvcc prints its real bin folder (_HERE_) in a dry run, wrapper or not.
  here=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1 || true)
  for d in "${here:+$(dirname "$here")}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ] && [ -x "$d/bin/nvcc" ]; then toolkit=$(cd "$d" && pwd -P); break; fi
  done
  if [ -z "$toolkit" ]; then
    echo "$TAG FAIL: found $NVCC but no CUDA toolkit folder with include/cuda_runtime.h and bin/nvcc (set CUDA_HOME)"
    exit 1
  fi
fi
echo "$TAG CUDA toolkit: $toolkit ($("$toolkit/bin/nvcc" --version | sed -n 's/^Cuda compilation tools, //p'))"

# --- the venv with a CUDA torch ------------------------------------------------------------------------
TORCH_VERSION=${DDIM_FAST_CUDA_TORCH:-2.14.1}
VENV=${DDIM_FAST_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ddim_fast/venv-cuda-torch-$TORCH_VERSION}
PY_BASE=${PYTHON:-python3}
mkdir -p "$REPO/build" "$(dirname "$VENV")"
venv_ok() {
  [ -f "$VENV/.ddim_fast_ready" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys, torch, numpy, setuptools, ninja  # noqa: F401
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
exec 8>"$VENV.lock"
command -v flock >/dev/null && flock 8  # one creator at a time (parallel CI stages, two checkouts)
if venv_ok; then
  echo "$TAG reusing $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
else
  echo "$TAG creating $VENV: torch==$TORCH_VERSION (a CUDA build, ~5.5 GB; log: build/cuda_build_check-venv.log)"
  t0=$(date +%s)
  rm -rf "$VENV"
  if ! { "$PY_BASE" -m venv "$VENV" &&
         "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy tqdm \
           "setuptools>=64" wheel ninja; } >"$REPO/build/cuda_build_check-venv.log" 2>&1; then
    grep -v "^WARNING: Location" "$REPO/build/cuda_build_check-venv.log" | tail -n 20
    echo "$TAG FAIL: could not create the CUDA torch venv (full log: build/cuda_build_check-venv.log)"
    exit 1
  fi
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "$TAG FAIL: torch==$TORCH_VERSION in $VENV is not a CUDA build"
    exit 1
  fi
  touch "$VENV/.ddim_fast_ready"
  echo "$TAG venv ready in $(( $(date +%s) - t0 )) s"
fi
exec 8>&-

# --- build a copy ---------------------------------------------------------------------------------------
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ddim_fast_cuda_build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The sources only: no built .so (the copy must build its own), no caches.
tar -c --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' setup.py pyproject.toml README.md csrc ddim_fast \
  | tar -x -C "$tmp"
log="$REPO/build/cuda_build_check.log"
echo "$TAG building the CUDA extension for TORCH_CUDA_ARCH_LIST=$ARCHS in $tmp (log: build/cuda_build_check.log)"
t0=$(date +%s)
if ! (cd "$tmp" && CUDA_HOME="$toolkit" PATH="$toolkit/bin:$PATH" TORCH_CUDA_ARCH_LIST="$ARCHS" \
        MAX_JOBS=${MAX_JOBS:-2} DDIM_FAST_NO_CUDA=0 "$VENV/bin/python" setup.py build_ext --inplace) >"$log" 2>&1 </dev/null; then
  grep -E "error|Error" "$log" | head -n 30 || tail -n 30 "$log"
  echo "$TAG FAIL: the CUDA extension did not build or link (full log: build/cuda_build_check.log)"
  exit 1
fi
grep -h "^ddim_fast: building" "$log" | sed "s/^/$TAG /" || true
if ! grep -q "^ddim_fast: building C++ CPU and CUDA kernels" "$log"; then
  echo "$TAG FAIL: setup.py did not build the CUDA kernels (see the line above; log: build/cuda_build_check.log)"
  exit 1
fi
# The standard must be the one this torch's own cpp_extension chooses (c++17 for 2.11, c++20 for 2.13+), read
# from its torch/utils/cpp_extension.py; not a fixed rule.
if ! "$VENV/bin/python" "$REPO/scripts/cuda_build_check.py" --check-std "$log"; then
  exit 1
fi
echo "$TAG built and linked in $(( $(date +%s) - t0 )) s ($(grep -oE -- '-std=c\+\+[0-9]+' "$log" | sort -u | tr '\n' ' '))"

# --- load and check -------------------------------------------------------------------------------------
arch_ids=$(echo "$ARCHS" | tr ';, ' '\n\n\n' | sed -n 's/^\([0-9]\+\)\.\([0-9]\+\).*/\1\2/p' | paste -sd, -)
cuobjdump=""
for c in "$toolkit/bin/cuobjdump" "$(command -v cuobjdump || true)" \
         "$("$PY_BASE" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump=$c; break; fi
done
status=0
(cd "$tmp" && CUDA_HOME="$toolkit" PYTHONPATH="$tmp" "$VENV/bin/python" "$REPO/scripts/cuda_build_check.py" \
   --arch "$arch_ids" --source-root "$tmp" ${cuobjdump:+--cuobjdump "$cuobjdump"}) </dev/null || status=$?
echo "$TAG finished in $(( $(date +%s) - start )) s"
exit $status

#!/usr/bin/env bash
# Compile-checks every csrc/**/*.cu with nvcc for sm_80 and sm_90 (no torch needed: the kernels are plain
# CUDA). Fails on any compile error, on any register spill ptxas reports, and on a vector kernel (the step's
# all-contiguous, 16-byte aligned path) whose SASS (cuobjdump -sass) lacks LDG.E.128 / STG.E.128; prints the
# widest global load/store and the registers of every kernel. NVCC_CHECK_JSON=FILE also writes those rows as
# JSON. Skips when nvcc is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "[nvcc-check] nvcc not found: skipped"
  exit 0
fi
PY=${PYTHON:-python3}
status=0
obj=$(mktemp --suffix=.o)
ptxas_log=$(mktemp --suffix=.log)
# cuobjdump reads the SASS: the toolkit's, one on PATH, or the one the triton wheel bundles (this project's CI
# has triton installed by the setup stage; the nvcc-only toolkit here has no cuobjdump).
CUOBJDUMP=${CUOBJDUMP:-}
for c in "$(dirname "$(readlink -f "$NVCC")")/cuobjdump" "$(command -v cuobjdump || true)" \
         "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  [ -z "$CUOBJDUMP" ] && [ -n "$c" ] && [ -x "$c" ] && CUOBJDUMP=$c
done
[ -n "${NVCC_CHECK_JSON:-}" ] && rm -f "$NVCC_CHECK_JSON"
mapfile -t files < <(find csrc -name '*.cu' | sort)
for f in "${files[@]}"; do
  log=$("$NVCC" -c -std=c++17 -O3 -Icsrc -Icsrc/include --expt-relaxed-constexpr \
        -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
        -Xptxas -v -o "$obj" "$f" 2>&1)
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "[nvcc-check] FAIL: $f does not compile:"; echo "$log" | grep -E "error" | head -20
    status=1
  elif echo "$log" | grep -qE "[1-9][0-9]* bytes spill"; then
    echo "[nvcc-check] FAIL: $f: ptxas reports register spills:"; echo "$log" | grep -B2 -E "[1-9][0-9]* bytes spill"
    status=1
  else
    kernels=$(echo "$log" | grep -c "Compiling entry function")
    echo "[nvcc-check] ok: $f (sm_80, sm_90; $kernels kernel instantiations, no spills)"
  fi
  if [ $rc -eq 0 ]; then
    if [ -z "$CUOBJDUMP" ]; then
      echo "[nvcc-check] FAIL: $f: no cuobjdump (toolkit, PATH or the triton wheel) to read the SASS with; set CUOBJDUMP"
      status=1
    else
      # Widest LDG/STG per kernel and target; a kernel of cuda_build_check.py's VECTOR_KERNELS must reach 128 bits.
      vector=()
      grep -q "ddim_step_vector_kernel" "$f" || vector=(--no-vector-kernels)
      echo "$log" >"$ptxas_log"
      "$PY" scripts/cuda_build_check.py --sass "$obj" --arch 80,90 --cuobjdump "$CUOBJDUMP" --ptxas-log "$ptxas_log" \
        --source "$f" ${NVCC_CHECK_JSON:+--json "$NVCC_CHECK_JSON" --json-append} "${vector[@]}" | sed 's/^\[cuda-build-check\]/[nvcc-check]  /'
      [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[nvcc-check] FAIL: $f: SASS check (above)"; status=1; }
    fi
  fi
done
rm -f "$obj" "$ptxas_log"
[ ${#files[@]} -eq 0 ] && echo "[nvcc-check] no .cu files"

# The torch bindings of the CUDA kernels (csrc/cuda/*.cpp) cannot be built against a CPU torch, but they can
# be syntax-checked against its headers plus CUDA's: only the header a CUDA build of torch generates is
# missing, and a one-line stand-in (in a temporary folder, never in the tree) replaces it.
PY=${PYTHON:-python3}
if torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))" 2>/dev/null); then
  py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  # CUDA's headers: beside nvcc's real location (it may be a wrapper), else the usual install folders.
  cuda_inc=""
  for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda /usr/local/cuda-*; do
    [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ] && { cuda_inc="$d/include"; break; }
  done
  stub=$(mktemp -d)
  mkdir -p "$stub/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
  for f in csrc/cuda/*.cpp; do
    [ -e "$f" ] || continue
    # shellcheck disable=SC2086
    if log=$(g++ -fsyntax-only -std=c++17 -DDDIM_FAST_WITH_CUDA -I"$stub" $torch_inc -I"$py_inc" -I"$cuda_inc" \
               -Icsrc -Icsrc/include "$f" 2>&1); then
      echo "[nvcc-check] ok: $f (torch bindings, syntax against torch $("$PY" -c 'import torch; print(torch.__version__)') headers)"
    else
      echo "[nvcc-check] FAIL: $f (torch bindings) does not compile:"; echo "$log" | grep -E "error" | head -20
      status=1
    fi
  done
  rm -rf "$stub"
else
  echo "[nvcc-check] torch not importable: bindings syntax check skipped"
fi
exit $status

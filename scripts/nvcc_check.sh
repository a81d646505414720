#!/usr/bin/env bash
# Compile-checks every csrc/**/*.cu with nvcc for sm_80 and sm_90 (no torch needed: the kernels are plain
# CUDA). Fails on any compile error and on any register spill ptxas reports. Skips when nvcc is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "[nvcc-check] nvcc not found: skipped"
  exit 0
fi
status=0
obj=$(mktemp --suffix=.o)
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
done
rm -f "$obj"
[ ${#files[@]} -eq 0 ] && echo "[nvcc-check] no .cu files"
exit $status

#!/usr/bin/env bash
# Installs what ddim-fast needs, idempotently, then builds the extension in place.
#   - torch: kept as it is when one is already installed (the GPU machines have their own CUDA build);
#     otherwise torch==2.13.0 (on this project's CPU machines that resolves to a local CPU wheel; a bare
#     `pip install torch` would pull several GB of CUDA packages).
#   - the package itself, editable, with --no-build-isolation: an isolated build would install a fresh
#     torch into a throwaway environment and compile against it instead of the torch you run with.
# Usage: scripts/setup_env.sh [EXTRAS]   (EXTRAS: "" for the main job, "test" for the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
echo "[setup] pip install --no-build-isolation -e '$spec' (builds ddim_fast._C)"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e "$spec"
# Editable installs build into a temporary tree; build in place too so the source checkout imports the
# extension directly (tests and `python -m ddim_fast` run from here).
LOCK=""; command -v flock >/dev/null && LOCK="flock /tmp/ddim_build.lock"
MAX_JOBS=${MAX_JOBS:-2} $LOCK "$PY" setup.py -q build_ext --inplace >/tmp/ddim_fast_build.log 2>&1 \
  || { cat /tmp/ddim_fast_build.log; exit 1; }
grep -h "^ddim_fast: building" /tmp/ddim_fast_build.log || true
"$PY" -c "import torch, ddim_fast.ops; print('[setup] ddim_fast ready with torch', torch.__version__)"

#!/usr/bin/env bash
# Installs what ddim-fast needs, idempotently, and builds its extension once, in place.
#   - torch: kept as it is when one is already installed (the GPU machines have their own CUDA build);
#     otherwise torch==2.13.0 (on this project's CPU machines that resolves to a local CPU wheel; a bare
#     `pip install torch` would pull several GB of CUDA packages).
#   - the package's dependencies for EXTRAS and an editable install (no compile: DDIM_FAST_SKIP_BUILD=1),
#     skipped when build/setup-EXTRAS.stamp says this pyproject.toml was installed already;
#   - the extension: `setup.py build_ext --inplace` with ninja, incremental (an up-to-date build costs a
#     few seconds), progress on the terminal, the full log in build/build.log, then the post-build self-check
#     (with one fallback compiler if it fails; scripts/native_toolchain.py). Everything it writes stays in the
#     checkout's build/ folder.
# Usage: scripts/setup_env.sh [EXTRAS]   (EXTRAS: "demo" for the main job, "test" for the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
mkdir -p build

# Several setups in one checkout (CI stages, parallel shells) must not build at the same time.
exec 9>build/.setup.lock
command -v flock >/dev/null && flock 9

pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -vE "Running pip as the 'root' user|^WARNING: Location" || true; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi

stamp="build/setup-${EXTRAS:-base}.stamp"
want="$("$PY" -c 'import sys, hashlib; print(sys.version.split()[0], hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import importlib.metadata as m; m.version('ddim-fast')" >/dev/null 2>&1; then
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  echo "[setup] pip install -e '$spec' (dependencies; the extension is built next)"
  pip_install "setuptools>=64" wheel ninja
  DDIM_FAST_SKIP_BUILD=1 pip_install --no-build-isolation -e "$spec"
  echo "$want" >"$stamp"
else
  echo "[setup] dependencies of '${EXTRAS:-base}' already installed (build/$(basename "$stamp"))"
fi

echo "[setup] building ddim_fast._C in place (log: build/build.log)"
# Build, then the self-check (scripts/native_selfcheck.py: every C++ op called with bad input in a child process
# must raise the documented exception, not kill the process); if it fails, one rebuild with a fallback compiler,
# and a clear stop if that fails too. The compiler that built the library is recorded in build/toolchain.json.
MAX_JOBS=${MAX_JOBS:-2} "$PY" scripts/native_toolchain.py build </dev/null
"$PY" -c "import torch, ddim_fast; print('[setup] ddim_fast ready with torch', torch.__version__)"

#!/usr/bin/env bash
# The main job on a fresh machine: install what is needed, then run the demo (embedded model, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo
exec "${PYTHON:-python3}" -m ddim_fast demo "$@"

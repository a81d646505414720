#!/usr/bin/env bash
# The test suite on a fresh machine: install what is needed, then run every test (CUDA tests skip without a GPU;
# Triton kernels run under TRITON_INTERPRET=1 on CPU, set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec "${PYTHON:-python3}" -m pytest tests -q "$@"

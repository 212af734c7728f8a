#!/usr/bin/env bash
# Install (with test extras) and run the whole test suite on CPU, with the Python that install.sh installs into.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
source scripts/python_env.sh
# tests/conftest.py sets TRITON_INTERPRET=1 (before anything imports triton) only where no CUDA device is visible:
# on a GPU the kernel's CUDA tests run the compiled kernel. An exported TRITON_INTERPRET is kept.
export OMP_WAIT_POLICY=PASSIVE
"$PY" -m pytest -q tests "$@"

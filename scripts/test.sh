#!/usr/bin/env bash
# Install (with test extras) and run the whole test suite on CPU, with the Python that install.sh installs into.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
source scripts/python_env.sh
# Triton kernels run on CPU through the interpreter; it must be set before anything imports triton.
export TRITON_INTERPRET=1 OMP_WAIT_POLICY=PASSIVE
"$PY" -m pytest -q tests "$@"

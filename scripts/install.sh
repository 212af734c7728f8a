#!/usr/bin/env bash
# Install fastlivt and everything it needs on a fresh Debian machine (idempotent; safe to re-run).
#   bash scripts/install.sh          # system packages + the package
#   bash scripts/install.sh --dev    # ... + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
bash scripts/install_system.sh
PIP="python3 -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python3 -c "import torch, torchvision" 2>/dev/null; then
  # See setup.py: the CPU machines need exactly this pair (a GPU server keeps its own torch).
  $PIP install -q torch==2.14.1 torchvision==0.29.1
fi
# DS_BUILD_OPS=0: DeepSpeed builds no C++/CUDA op at install time.
DS_BUILD_OPS=0 $PIP install -q -e ".${extra}"

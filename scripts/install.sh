#!/usr/bin/env bash
# Install fastlivt and everything it needs on a fresh Debian/Ubuntu machine (idempotent; safe to re-run).
#   bash scripts/install.sh          # system packages + the package with every optional engine (extra "engines":
#                                    # FFCV, DALI, xformers, DeepSpeed; `pip install fastlivt` alone installs none)
#   bash scripts/install.sh --dev    # ... + test dependencies
# Python: see scripts/python_env.sh (an active venv, else python3, else ./.venv where python3 is externally managed).
# When it installs into ./.venv, the `fastlivt` command is linked into /usr/local/bin so that it is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="[engines]"
[ "${1:-}" = "--dev" ] && extra="[engines,dev]"
bash scripts/install_system.sh
source scripts/python_env.sh
echo "install: Python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
PIP="$PY -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  # See setup.py: the CPU machines need exactly this pair (a GPU server keeps its own torch).
  $PIP install -q torch==2.14.1 torchvision==0.29.1
fi
# DS_BUILD_OPS=0: DeepSpeed builds no C++/CUDA op at install time.
DS_BUILD_OPS=0 $PIP install -q -e ".${extra}"

if [ "$PY" = "$VENV/bin/python3" ]; then
  link=/usr/local/bin/fastlivt
  target="$VENV/bin/fastlivt"
  if [ "$(readlink "$link" 2>/dev/null || true)" != "$target" ]; then
    if [ -e "$link" ] && [ ! -L "$link" ]; then
      echo "install: $link exists and is not a link; left alone: run $target" >&2
    else
      SUDO=""
      [ -w "$(dirname "$link")" ] || SUDO="sudo"
      $SUDO ln -sfn "$target" "$link"
      echo "install: linked $link -> $target"
    fi
  fi
fi
echo "install: done ($("$PY" -c 'import fastlivt, os; print(os.path.dirname(fastlivt.__file__))'))"

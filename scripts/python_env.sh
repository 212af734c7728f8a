# Sourced by install.sh and test.sh: chooses the Python that fastlivt is installed into and tested with, as $PY.
#   1. an active virtual environment (VIRTUAL_ENV, or a conda env): its python3;
#   2. else ./.venv if an earlier install created it;
#   3. else python3, unless it is "externally managed" (PEP 668: Debian 12, Ubuntu 24.04 system Python), where pip
#      refuses to install: then a new ./.venv. It sees the system site-packages only when python3 already imports
#      torch (a GPU server's own CUDA build is kept instead of downloading a CPU wheel); otherwise it is isolated from
#      the distribution's Python packages.
# FASTLIVT_VENV=0 forces python3 itself (the caller then owns the consequences); FASTLIVT_PYTHON=/path picks the base.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
BASE_PY="${FASTLIVT_PYTHON:-python3}"

externally_managed() {
  "$1" - <<'PY'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if (not in_venv and os.path.isfile(marker)) else 1)
PY
}

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ] || [ "${FASTLIVT_VENV:-}" = "0" ]; then
  PY="$BASE_PY"
elif [ -x "$VENV/bin/python3" ]; then
  PY="$VENV/bin/python3"
elif externally_managed "$BASE_PY"; then
  flags=()
  if "$BASE_PY" -c "import torch" 2>/dev/null; then
    flags=(--system-site-packages)
    echo "python_env: $BASE_PY is externally managed and has torch: creating $VENV on top of it (--system-site-packages)"
  else
    echo "python_env: $BASE_PY is externally managed (PEP 668): creating the virtual environment $VENV"
  fi
  "$BASE_PY" -m venv "${flags[@]}" "$VENV"
  PY="$VENV/bin/python3"
else
  PY="$BASE_PY"
fi
export PY

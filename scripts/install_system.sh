#!/usr/bin/env bash
# Idempotent install of the system packages fastlivt needs (Debian/Ubuntu, run as root or with sudo).
#   pkg-config libturbojpeg0-dev libopencv-dev : build and run FFCV's C extension (it links these at run time)
#   dataset-fashion-mnist                      : the real images of the embedded Fashion-MNIST-LT demo
#   build-essential python3-dev               : compile FFCV's extension and DeepSpeed's sdist
#   python3-venv                              : ./.venv where the system Python is externally managed (PEP 668)
set -euo pipefail
pkgs=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist build-essential python3-dev python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_system: all system packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_system: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

#!/usr/bin/env bash
# Fill the wheel folder that goes to the GPU machine (no network there): the cp312 manylinux x86_64 wheels of what
# fastlivt needs beyond that machine's image (see scripts/gpu_check.sh), i.e. pydantic and its dependencies; nothing
# the image already has. scripts/gpu_check.sh installs from it with `pip install --no-index --find-links`.
#   bash scripts/gpu_wheels.sh [DIR]        (default .gpu_wheels/, ignored by git; must stay <= 20 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${GPU_WHEELS:-.gpu_wheels}}
PY=${PY:-python3}
# Versions from setup.py's requirement; pip resolves the dependencies for the target, not for this machine.
PACKAGES=("pydantic>=2")
mkdir -p "$DIR"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$DIR" "${PACKAGES[@]}"
size_kib=$(du -sk "$DIR" | cut -f1)
ls -1 "$DIR"
echo "gpu_wheels: $DIR holds $(ls "$DIR" | wc -l) wheels, ${size_kib} KiB"
if [ "$size_kib" -gt $((20 * 1024)) ]; then
    echo "gpu_wheels: $DIR is over 20 MiB: something the image already has was pulled in" >&2
    exit 1
fi

#!/usr/bin/env bash
# A CPU twin of the GPU image that scripts/gpu_check.sh targets, and the script's dry run in it.
#   bash scripts/gpu_twin.sh            (builds the venv once, then runs `DRY_RUN=cpu bash scripts/gpu_check.sh`)
# The image: Python 3.12 venv with torch 2.11.0 (cu130) + triton 3.6.0 + torchvision 0.26.0, timm, numpy 2, pyyaml,
# safetensors, tqdm, pillow, matplotlib, pytest, pytest-timeout, numba, cupy, opencv-python-headless; no pydantic,
# FFCV, DALI, xformers or DeepSpeed, no network. The twin holds the same releases of the packages fastlivt touches
# (PyPI's Linux torch 2.11.0 wheel is the CUDA build: it runs on the CPU; cupy is left out, nothing here imports it),
# nothing else; pydantic arrives only from the wheel folder (scripts/gpu_wheels.sh), as on the GPU machine.
# It fails (exit 1) when a step's log holds a Traceback or ImportError, a step did not end "ok", or a step's part
# wrote no rows. Env: GPU_TWIN_VENV (default ~/.cache/fastlivt/gpu-twin), GPU_TWIN_PYTHON (a Python 3.12), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_TWIN_VENV:-$HOME/.cache/fastlivt/gpu-twin}
BASE_PY=${GPU_TWIN_PYTHON:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3)}
OUT=${OUT:-runs/gpu_twin}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
# The image's releases (torch pins its own triton: 3.6.0 for 2.11.0); pillow<13 as setup.py asks. With numpy >= 2.4
# triton 3.6's interpreter cannot run the Bal-BCE kernel (fastlivt.kernels.launch.interpreter_problem): the dry run's kernel
# tests skip with that reason and the CPU loss takes PyTorch (logged); on the GPU the kernel runs compiled.
IMAGE_PACKAGES=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm numpy pyyaml safetensors tqdm "pillow<13"
                matplotlib pytest pytest-timeout numba opencv-python-headless)
# What the wheel folder brings (typing-extensions stays: torch itself needs it, so the image has it).
FOLDER_ONLY=(pydantic pydantic-core annotated-types typing-inspection)

if [ ! -x "$VENV/bin/python3" ]; then
    [ -x "$BASE_PY" ] || { echo "gpu_twin: no Python 3.12 at $BASE_PY (set GPU_TWIN_PYTHON)" >&2; exit 2; }
    echo "gpu_twin: building $VENV from $BASE_PY ($("$BASE_PY" -V))"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.image_packages" 2>/dev/null)" != "${IMAGE_PACKAGES[*]}" ]; then  # built once; again on a change
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python3" -m pip install -q --only-binary=:all: "${IMAGE_PACKAGES[@]}"
    echo "${IMAGE_PACKAGES[*]}" > "$VENV/.image_packages"
fi
PY="$VENV/bin/python3"
"$PY" -c 'import torch, triton, torchvision, timm, sys
print("gpu_twin: Python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "torchvision", torchvision.__version__, "timm", timm.__version__)'
for mod in pydantic ffcv nvidia.dali xformers deepspeed; do  # the image has none of these before gpu_check runs
    if [ "$mod" = pydantic ]; then "$PY" -m pip uninstall -q -y "${FOLDER_ONLY[@]}" 2>/dev/null || true; fi
    if "$PY" -c "import $mod" 2>/dev/null; then echo "gpu_twin: $mod imports in $VENV: not a twin of the image" >&2; exit 1; fi
done

[ -d "$WHEELS" ] || bash scripts/gpu_wheels.sh "$WHEELS"
rm -rf "$OUT"
# Fresh compile caches, as on a GPU machine that has never run fastlivt (warm Inductor caches hide compile time).
CACHES=$(mktemp -d)
trap 'rm -rf "$CACHES"' EXIT
START=$SECONDS
PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" DRY_RUN=cpu OUT="$OUT" GPU_WHEELS="$WHEELS" \
    TORCHINDUCTOR_CACHE_DIR="$CACHES/inductor" TRITON_CACHE_DIR="$CACHES/triton" bash scripts/gpu_check.sh
echo "gpu_twin: gpu_check.sh (DRY_RUN=cpu) took $((SECONDS - START)) s"
"$PY" scripts/gpu_check_verify.py "$OUT"

#!/usr/bin/env bash
# The GPU-only checks and timings in one run (a lent GPU server: torch + triton present, no internet).
#   bash scripts/gpu_check.sh [WHEEL_DIR]        results go to $OUT (default runs/gpu_check)
# WHEEL_DIR holds the wheels the server lacks (timm, xformers, deepspeed and pydantic's, for its Python); they are
# installed into /tmp/site, never into the server's environment. Order: CUDA-marked tests (kernel, attention,
# loaders), then `fastlivt bench loss|model|deepspeed --device cuda` (the loss part sweeps the kernel's launch layouts).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR=/tmp/ext
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernel.py tests/test_attention.py \
    tests/test_loaders.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
for part in loss model deepspeed; do  # each part rewrites $OUT/bench-<date>-<device>.* : keep a copy per part
    timeout 200 python3 -m fastlivt bench "$part" --device cuda --out "$OUT/$part" 2>&1 \
        | grep -v "FutureWarning\|return func" | tail -40 | tee "$OUT/bench-$part.txt"
done

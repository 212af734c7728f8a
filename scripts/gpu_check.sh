#!/usr/bin/env bash
# The GPU checks and timings for a short window on a lent GPU server (torch 2.11 + triton 3.6 + timm + torchvision;
# no FFCV, DALI, xformers or DeepSpeed: those rows say `unavailable: <reason>`). No wheels, no network, <= 6 minutes.
#   OUT=/path bash scripts/gpu_check.sh          (default OUT=runs/gpu_check)
# In priority order, each step under its own timeout, every row written as soon as measured (`fastlivt bench`
# rewrites $OUT/<part>/bench-*.{json,md} after every part) and every log teed into $OUT:
#   1. environment and the bf16 GEMM peak (the MFU denominator)                                  ~20 s
#   2. the Bal-BCE kernel's CUDA tests; `bench loss` (C = 365, 1000, 8142; launch sweep at 8142)  ~80 s
#   3. MGP ViT-B/16 and BFT ViT-B/16 224 bf16, eager vs torch.compile: img/s, MFU, peak memory    ~120 s
#   4. nvJPEG decode images/s (`bench data --device cuda`; a logged skip if that part is missing) ~60 s
#   5. ViT-L/16 384 BFT step (plain PyTorch, +/- activation checkpointing; ZeRO-3 rows need DeepSpeed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE
START=$SECONDS
step() {  # step NAME TIMEOUT_S CMD... : run, tee the full log, say how it ended; never abort the script
    local name=$1 limit=$2; shift 2
    local cmd="$*"
    echo "=== [$((SECONDS - START)) s] $name (limit ${limit} s): ${cmd:0:100}" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "    $name: TIMED OUT after ${limit} s (rows so far kept)" | tee -a "$OUT/summary.txt"
    elif [ $rc -ne 0 ]; then echo "    $name: exit $rc (see $OUT/$name.log)" | tee -a "$OUT/summary.txt"
    else echo "    $name: ok" | tee -a "$OUT/summary.txt"; fi
}
bench() {  # bench PART TIMEOUT_S [ARGS...]
    local part=$1 limit=$2; shift 2
    step "bench-$part" "$limit" python3 -m fastlivt bench "$part" --device cuda --out "$OUT/$part" "$@"
}

# 1. environment and GEMM peak
step env 80 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
python3 - <<PY
import torch, triton, timm, torchvision
from fastlivt.bench.common import gemm_peak_flops
print("torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__, "torchvision", torchvision.__version__)
for mod in ("ffcv", "nvidia.dali", "deepspeed", "xformers"):
    try:
        __import__(mod); print(mod, "imports")
    except Exception as e:
        print(mod, "unavailable:", type(e).__name__, e)
d = torch.device("cuda")
for dt in (torch.bfloat16, torch.float32):
    print("GEMM peak", dt, round(gemm_peak_flops(d, dt) / 1e12, 1), "TFLOP/s (8192^3, best of 10)")
PY'

# 2. the kernel: correctness on the GPU, then the loss benchmark (C = 8142 included, with the launch-layout sweep)
step tests-kernel 90 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernel.py
bench loss 100 --quick

# 3. the training step at the FLOP limit: MGP and BFT ViT-B/16 224 bf16, eager vs compiled, MFU and peak memory
bench compiled 170

# 4. GPU decoding (nvJPEG through torchvision) against the step's images/s
if python3 -c "import torchvision.io as io, sys; sys.exit(0 if hasattr(io, 'decode_jpeg') else 1)"; then
    bench data 70 --quick
else
    echo "    skip: torchvision.io.decode_jpeg missing (no nvJPEG row)" | tee -a "$OUT/summary.txt"
fi

# 5. ViT-L/16 at 384 (last: the largest model, the first thing to drop when the window is short)
REMAIN=$((360 - (SECONDS - START)))
if [ $REMAIN -gt 40 ]; then
    bench deepspeed $((REMAIN - 10)) --quick
else
    echo "    skip: ViT-L/384 (only ${REMAIN} s of the 6-minute window left)" | tee -a "$OUT/summary.txt"
fi
echo "=== done in $((SECONDS - START)) s; rows in $OUT/*/bench-*.md, logs in $OUT/*.log" | tee -a "$OUT/summary.txt"
cat "$OUT"/*/bench-*.md > "$OUT/all_rows.md" 2>/dev/null

#!/usr/bin/env bash
# The GPU checks and timings for a short window on a lent GPU server, every figure in <= 330 s of step limits.
#   OUT=/path bash scripts/gpu_check.sh            (default OUT=runs/gpu_check; GPU_WHEELS=.gpu_wheels)
#   DRY_RUN=cpu bash scripts/gpu_check.sh          the same steps on the CPU (scripts/gpu_twin.sh runs it in a twin
#                                                  of the GPU image): every step reaches its measuring code
#   PLAN_ONLY=1 bash scripts/gpu_check.sh          print the steps (name, limit, command) and exit
# The image it targets: Python 3.12 venv, torch 2.11 + triton 3.6 + torchvision 0.26 + timm, numpy, pyyaml,
# safetensors, tqdm, pillow, matplotlib, pytest, numba, opencv-python-headless; no network; no pydantic, FFCV, DALI,
# xformers or DeepSpeed. pydantic comes from the wheel folder (bash scripts/gpu_wheels.sh, brought along), installed
# first with `pip install --no-index`; the engine rows say `unavailable: <reason>`.
# Steps in priority order, each under its own limit, every row written as soon as measured (`fastlivt bench` rewrites
# $OUT/<part>/bench-*.{json,md} after every group of rows), every log teed into $OUT:
#   env             environment and the bf16/fp32 GEMM peak (the MFU denominator)
#   tests-kernel    the Bal-BCE kernel's CUDA tests, compiled (TRITON_INTERPRET=0), and the device crop's and
#                   RandAugment's CUDA tests
#   bench-loss      the loss benchmark (C = 365, 1000, 8142; launch sweep at 8142)
#   bench-compiled  MGP and BFT ViT-B/16 224 bf16, eager vs torch.compile: img/s, MFU, peak memory
#   bench-data      nvJPEG decode images/s, the shared device pipeline (crop + flip + RandAugment + normalise + erasing +
#                   Mixup/CutMix) at 224 px, B = 32 and 256 (the loader rows need FFCV's converter: unavailable here)
#   bench-deepspeed ViT-L/16 384 BFT step, plain PyTorch +/- activation checkpointing (ZeRO-3 rows need DeepSpeed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
DRY_RUN=${DRY_RUN:-}
PY=${PY:-python3}
# name:limit_s, in the order they run; the limits add up to 330 s (tests/project/test_gpu_check.py checks both).
STEPS="env:25 tests-kernel:50 bench-loss:60 bench-compiled:110 bench-data:35 bench-deepspeed:50"
if [ "$DRY_RUN" = cpu ]; then
    DEVICE=cpu INTERPRET=1 COMPILED_ARGS=(--quick)
    # 2 shared CPU cores: the CPU limits are those of a 6-minute dry run, not the GPU's (torch.compile on 2 cores).
    STEPS="env:25 tests-kernel:45 bench-loss:45 bench-compiled:200 bench-data:30 bench-deepspeed:15"
    KERNEL_TESTS=(tests/kernels/test_bal_bce.py tests/kernels/test_bal_bce_layout.py -m "not cuda")
elif [ -n "$DRY_RUN" ]; then
    echo "gpu_check: DRY_RUN=$DRY_RUN: only DRY_RUN=cpu is known" >&2; exit 2
else
    DEVICE=cuda INTERPRET=0 COMPILED_ARGS=()
    # with the device data pipeline's CUDA tests (crop, RandAugment: torch and timm only)
    KERNEL_TESTS=(tests/kernels/test_bal_bce.py tests/kernels/test_bal_bce_layout.py tests/fastlivt/data/test_device_crop.py
                  tests/fastlivt/data/test_device_randaugment.py -m cuda)
fi
limit() { local s; for s in $STEPS; do [ "${s%%:*}" = "$1" ] && { echo "${s#*:}"; return; }; done; echo "no limit for $1" >&2; exit 2; }

step() {  # step NAME CMD... : run under NAME's limit, tee the full log, say how it ended; never abort the script
    local name=$1; shift
    local lim; lim=$(limit "$name")
    local cmd="$*"
    if [ -n "${PLAN_ONLY:-}" ]; then cmd=${cmd//$'\n'/ }; echo "$name $lim TRITON_INTERPRET=$TRITON_INTERPRET ${cmd:0:300}"; return; fi
    echo "=== [$((SECONDS - START)) s] $name (limit ${lim} s): ${cmd:0:120}" | tee -a "$OUT/summary.txt"
    timeout --kill-after=5 "$lim" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "    $name: TIMED OUT after ${lim} s (rows so far kept)" | tee -a "$OUT/summary.txt"
    elif [ $rc -ne 0 ]; then echo "    $name: exit $rc (see $OUT/$name.log)" | tee -a "$OUT/summary.txt"
    else echo "    $name: ok" | tee -a "$OUT/summary.txt"; fi
}
bench() {  # bench PART [ARGS...]
    local part=$1; shift
    step "bench-$part" "$PY" -m fastlivt bench "$part" --device "$DEVICE" --out "$OUT/$part" "$@"
}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=$INTERPRET OMP_WAIT_POLICY=PASSIVE
START=$SECONDS
if [ -z "${PLAN_ONLY:-}" ]; then
    mkdir -p "$OUT"
    # 0. pydantic (fastlivt.config needs it) from the wheel folder, without network, before anything else
    if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-index --find-links "$WHEELS" pydantic \
            2>&1 | tee -a "$OUT/summary.txt"
    else
        echo "gpu_check: the wheel folder $WHEELS is missing: make it with 'bash scripts/gpu_wheels.sh' where there" \
             "is network and bring it along (or set GPU_WHEELS=DIR)" | tee -a "$OUT/summary.txt" >&2
    fi
    if ! "$PY" -c "import pydantic" 2>/dev/null; then
        echo "gpu_check: pydantic does not import, and fastlivt.config needs it: no bench part could run; stopping" \
             | tee -a "$OUT/summary.txt" >&2
        exit 2
    fi
fi

# 1. environment and GEMM peak
step env bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
"$0" - "$1" <<PY
import sys, torch, triton, timm, torchvision
from fastlivt.bench.common import gemm_peak_flops
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "timm",
      timm.__version__, "torchvision", torchvision.__version__)
for mod in ("pydantic", "ffcv", "nvidia.dali", "deepspeed", "xformers"):
    try:
        __import__(mod); print(mod, "imports")
    except Exception as e:
        print(mod, "unavailable:", e)
d = torch.device(sys.argv[1])
for dt in (torch.bfloat16, torch.float32):
    print("GEMM peak", d, dt, round(gemm_peak_flops(d, dt) / 1e12, 3), "TFLOP/s")
PY' "$PY" "$DEVICE"

# 2. the kernel: correctness on the GPU (compiled; on the CPU dry run the interpreter tests), then the loss benchmark
step tests-kernel "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"
bench loss --quick

# 3. the training step at the FLOP limit: MGP and BFT ViT-B/16 224 bf16, eager vs compiled, MFU and peak memory
bench compiled "${COMPILED_ARGS[@]}"

# 4. GPU decoding (nvJPEG through torchvision) against the step's images/s
bench data --quick

# 5. ViT-L/16 at 384 (last: the largest model, the first thing to drop when the window is short)
bench deepspeed --quick

[ -n "${PLAN_ONLY:-}" ] && exit 0
echo "=== done in $((SECONDS - START)) s; rows in $OUT/*/bench-*.md, logs in $OUT/*.log" | tee -a "$OUT/summary.txt"
cat "$OUT"/*/bench-*.md > "$OUT/all_rows.md" 2>/dev/null
exit 0

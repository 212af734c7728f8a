"""How the fused Bal-BCE kernel is launched: availability, layout, argument list, the launch counter.

The argument list is built in one place (:func:`launch_args`) so that the real launch and the sm_90 compilation that
``fastlivt bench loss`` disassembles (:mod:`fastlivt.kernels.sass`) use the same arguments, constexprs and layout.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACC_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.float32, torch.float16: tl.float32}
LAUNCHES: Counter = Counter()  # kernel launches by name since import (``fastlivt bench loss`` counts them per call)
PASSES: Counter = Counter()  # whole N x C passes of those launches: "logits read", "target read", "gradient written"


def record_launch(name: str, passes: Iterable[str] = ()) -> None:
    """Count one launch of kernel ``name`` and the whole [N, C] arrays it reads or writes (``passes``)."""
    LAUNCHES[name] += 1
    PASSES.update(passes)


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET holds a value triton reads as true (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


@triton.jit
def _loop_bound_probe(out_ptr, n):
    bound = tl.program_id(0) + n  # a loop bound computed in the kernel, as the Bal-BCE kernel's chunk loop has
    acc = tl.zeros([1], tl.float32)
    for _ in range(0, bound):
        acc += 1.0
    tl.store(out_ptr + tl.arange(0, 1), acc)


_INTERPRETER_PROBE: Dict[str, str] = {}  # a plain dict: dynamo reads it as a constant (it would trace into lru_cache)


def interpreter_problem() -> str:
    """'' when Triton's interpreter runs a loop whose bound is computed in the kernel; else why not. (triton 3.6's
    interpreter turns such a bound into a Python int with int() of a 1-element numpy array, which numpy >= 2.4
    refuses; triton 3.8 squeezes the array first.) Probed once per process, on a one-program kernel, when a loss
    first chooses its path (before any compiled region runs it)."""
    if "problem" not in _INTERPRETER_PROBE:
        _INTERPRETER_PROBE["problem"] = _probe_interpreter()
    return _INTERPRETER_PROBE["problem"]


def _probe_interpreter() -> str:
    out = torch.zeros(1)
    try:
        _loop_bound_probe[(1,)](out, 3)
    except Exception as e:
        import numpy

        return (f"triton {triton.__version__}'s interpreter cannot run the kernel with numpy {numpy.__version__} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return "" if out.item() == 3.0 else f"triton {triton.__version__}'s interpreter computed a wrong loop count"


def kernel_available(device: torch.device) -> Tuple[bool, str]:
    """Whether the kernel can run on tensors of ``device``, and why (for logs and benchmark rows)."""
    if device.type == "cuda":
        return True, "logits on CUDA"
    if interpreter_enabled():
        problem = interpreter_problem()
        if problem:
            return False, f"TRITON_INTERPRET=1 but {problem}"
        return True, f"TRITON_INTERPRET=1 (logits on {device.type}, Triton interpreter)"
    return False, f"logits on {device.type} and TRITON_INTERPRET is not set (Triton needs CUDA or its interpreter)"


def default_fast(dtype: torch.dtype) -> bool:
    """The approximate-math path is the default where the gradient is stored in 16 bits (its error is far below)."""
    return dtype in (torch.bfloat16, torch.float16)


def use_asm(fast: bool, interpret: Optional[bool] = None) -> bool:
    """Whether the kernel uses PTX ex2/lg2/rcp.approx (inline assembly): on a GPU when ``fast``; never under the
    interpreter, which cannot run inline assembly (there ``fast`` keeps its formulas with precise exp2/log2/division)."""
    interpret = interpreter_enabled() if interpret is None else interpret
    return bool(fast) and not interpret


def vector_width(n: int, c: int) -> int:
    """G: the largest power of two ≤ 8 dividing N·C and not above C (vectors never span more than two rows)."""
    g = 8
    while g > 1 and ((n * c) % g or g > c):
        g //= 2
    return g


def rows_per_program(n: int, c: int, interpret: Optional[bool] = None) -> int:
    """Rows per program: 1 on a GPU; under the interpreter (programs run one after another in Python) enough rows
    for about 16,384 logits per program."""
    interpret = interpreter_enabled() if interpret is None else interpret
    return max(1, min(n, 16384 // c)) if interpret else 1


def launch_config(n: int, c: int, interpret: Optional[bool] = None) -> Tuple[int, int]:
    """(BLOCK, num_warps): each program walks its ~C owned logits (ROWS·C in the interpreter) in chunks of BLOCK.

    GPU: chunks of up to 2,048 logits and 4 warps (16 logits, two 128-bit bf16 vectors per thread and iteration), fewer
    warps for short rows. The interpreter takes one chunk per program.
    """
    interpret = interpreter_enabled() if interpret is None else interpret
    need = triton.next_power_of_2(c + vector_width(n, c))
    if interpret:
        rows = rows_per_program(n, c, interpret)
        return min(triton.next_power_of_2(rows * c + vector_width(n, c)), 1 << 15), 4
    block = max(256, min(need, 2048))
    return block, max(1, min(4, block // 512))


def launch_candidates(n: int, c: int) -> list:
    """The (BLOCK, num_warps) layouts ``fastlivt bench loss`` times on a GPU besides :func:`launch_config`."""
    out = []
    for block in (1024, 2048, 4096):
        for warps in (2, 4, 8):
            if block >= 32 * warps * vector_width(n, c) and (block, warps) not in out:
                out.append((block, warps))
    return out


_COUNTERS: Dict[torch.device, torch.Tensor] = {}


def counter_for(device: torch.device) -> torch.Tensor:
    """The int32 arrival counter of the last-program reduction on ``device``: zeroed once, left at 0 by every launch.
    (Concurrent launches on two streams of one device would share it: the loss is meant for one stream.)"""
    cnt = _COUNTERS.get(device)
    if cnt is None:
        cnt = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return cnt


def check_inputs(logits: torch.Tensor, bias, label_a, label_b, target) -> None:
    ok, why = kernel_available(logits.device)
    if not ok:
        raise RuntimeError(f"fused Bal-BCE kernel: {why}; use the PyTorch path (fused='torch') on this device")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"fused Bal-BCE kernel: logits must be a non-empty [N, C] tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused Bal-BCE kernel: logits dtype {logits.dtype} not in {SUPPORTED_DTYPES}")
    n, c = logits.shape
    if bias is not None:
        if bias.shape != (c,):
            raise ValueError(f"fused Bal-BCE kernel: bias has shape {tuple(bias.shape)}, expected ({c},)")
        if bias.requires_grad:
            raise ValueError("fused Bal-BCE kernel: the logit bias is a constant; it must not require grad")
    if target is not None:
        if target.shape != logits.shape or not target.is_floating_point():
            raise ValueError(f"fused Bal-BCE kernel: dense target must be float [N, C]={n, c}, "
                             f"got {target.dtype} {tuple(target.shape)}")
    else:
        for name, lab in (("label_a", label_a), ("label_b", label_b)):
            if lab is None or lab.shape != (n,) or lab.is_floating_point() or lab.dtype == torch.bool:
                raise ValueError(f"fused Bal-BCE kernel: {name} must be an integer tensor of shape ({n},), "
                                 f"got {None if lab is None else (lab.dtype, tuple(lab.shape))}")
    for t in (bias, label_a, label_b, target):
        if t is not None and t.device != logits.device:
            raise ValueError(f"fused Bal-BCE kernel: all inputs must be on {logits.device}, got one on {t.device}")


def launch_args(logits: torch.Tensor, bias, label_a, label_b, lam: float, smoothing: float, target, grad_out,
                write_grad: bool, grad_scale: float, fast: Optional[bool],
                config: Optional[Tuple[int, int]],
                bias_table: Callable[[torch.Tensor, int, int, int], Tuple[torch.Tensor, int]], rows: Optional[int] = None):
    """(positional args, constexprs, grid, num_warps, {"loss", "grad"}) of one launch of ``_bal_bce_kernel``."""
    if target is None and label_b is None:
        label_b = label_a  # hard labels
    check_inputs(logits, bias, label_a, label_b, target)
    if not (0.0 <= lam <= 1.0) or not (0.0 <= smoothing < 1.0):
        raise ValueError(f"fused Bal-BCE kernel: need 0 <= lam <= 1 and 0 <= smoothing < 1, got lam={lam}, smoothing={smoothing}")
    logits = logits.contiguous()  # a no-op for the usual contiguous head output
    n, c = logits.shape
    fast = default_fast(logits.dtype) if fast is None else bool(fast)
    if fast and logits.dtype == torch.float64:
        raise ValueError("fused Bal-BCE kernel: fast=True (approximate fp32 math) is not offered for float64 logits")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    g = vector_width(n, c)
    grad = None
    if write_grad:
        grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device) if grad_out is None else grad_out
        if grad.shape != (n, c) or grad.dtype != logits.dtype or not grad.is_contiguous():
            raise ValueError(f"fused Bal-BCE kernel: grad_out must be a contiguous [N, C] {logits.dtype} tensor")
    dense = target is not None
    if dense:
        target = target.contiguous()
    rows = rows_per_program(n, c) if rows is None else int(rows)
    if rows < 1:
        raise ValueError(f"fused Bal-BCE kernel: rows per program must be >= 1, got {rows}")
    programs = triton.cdiv(n, rows)
    table, length = bias_table(bias, c, g, rows) if bias is not None else (logits, 16)
    off = smoothing / c
    on = 1.0 - smoothing + off
    block, num_warps = config or launch_config(n, c)
    if block < g:
        raise ValueError(f"fused Bal-BCE kernel: BLOCK={block} is below the vector width {g}")
    part = torch.empty(programs, dtype=acc, device=logits.device)
    loss = torch.empty((), dtype=acc, device=logits.device)
    args = (logits, table, length,
            label_a if not dense else logits, label_b if not dense else logits, float(lam), off, on - off,
            target if dense else logits,
            grad if grad is not None else logits,
            float(grad_scale),
            part, counter_for(logits.device), loss,
            n, c)
    if not math.isfinite(grad_scale):
        raise ValueError(f"fused Bal-BCE kernel: grad_scale must be a finite number, got {grad_scale}")
    constexprs = dict(HAS_BIAS=bias is not None, DENSE=dense, WRITE_GRAD=grad is not None, FAST=fast, ASM=use_asm(fast),
                      ACC=ACC_TL[logits.dtype], G=g, BLOCK=block, RBLOCK=min(1024, triton.next_power_of_2(programs)),
                      ROWS=rows, CAND=triton.next_power_of_2(2 * (rows + 1)),
                      # the label fix-up subtracts from the linear sum; with one row per program that sum holds a
                      # row's label terms alone (exact cancellation), with several it needs float64 to stay exact
                      LACC=tl.float64 if rows > 1 else ACC_TL[logits.dtype])
    return args, constexprs, (programs,), num_warps, {"loss": loss, "grad": grad}


"""Balanced binary cross-entropy fused into one Triton launch: loss, gradient and the scalar reduction together.

For logits z [N, C], a per-class logit bias b [C] (already multiplied by τ) and soft targets y [N, C]::

    x      = z + b
    loss   = (1/N) Σ_n Σ_c  max(x, 0) − x·y + log1p(exp(−|x|))      (sum over classes, mean over the batch)
    ∂loss/∂z = (σ(x) − y) / N

Layout (flat): the N·C logits are one flat array cut into vectors of G = 8 elements (fewer when N·C or C is not a
multiple of 8). Row r's program owns the vectors that *start* in row r, so every element has exactly one owner, the
loads and stores are whole aligned vectors (128-bit for 8 bf16) although a row of 8,142 bf16 is not 16-byte aligned, and
a program touches at most rows r and r + 1. (Under the interpreter, which runs programs one by one, a program takes
several consecutive rows the same way.) The bias comes from a small table ``bias_table[d, m] = b[(m + d) mod C]``
(d = the row's phase within a vector), so it is read with aligned vector loads too.

Targets in the compact mixup form (label_a, label_b, λ, smoothing; timm's ``mixup_target``)::

    y = off + (on − off)·(λ·[c = label_a] + (1 − λ)·[c = label_b]),   on = 1 − s + s/C, off = s/C

The main loop treats every element as y = off (no label compares); afterwards each program fixes up the at most four
label elements it owns (rewrites their gradient, subtracts (on − off)·w·x from the loss), as Liger-Kernel and
flash-attention do for the label logit. The loss keeps its linear part Σ max(x, 0) − x·y apart from the log terms until
that subtraction, so confident logits (loss ≈ e^-margin) keep their relative accuracy. A dense-target variant reads y.

The gradient is written only when asked (``write_grad``), multiplied by ``grad_scale`` (a number: the gradient the
loss's backward will receive, see :mod:`fastlivt.kernels.bal_bce_op`), so that the backward hands it on without another pass. The
scalar loss needs no second kernel: each program stores its partial sum, bumps a counter (acq_rel), and the last
program adds the partials in a fixed order (deterministic) and resets the counter (ATen's last-block reduction). A label
outside [0, C) makes the loss NaN (a host check would synchronise).

Accuracy. ``fast=False`` (fp32/fp64 logits by default): relative errors ≈ 1e-7 (fp32) against float64. ``fast=True``
(the default for bf16/fp16 logits on CUDA): exp2, log2 and reciprocal use the hardware approximations ex2.approx.ftz,
lg2.approx.ftz and rcp.approx.ftz (PTX ISA: relative error ≤ 2^-22 for ex2/rcp, absolute ≤ 2^-22 for lg2 on [1, 2]) and
log1p(e) is computed as log2(1 + e)·ln 2. Bound: each gradient element within 2^-20/N of (σ(x) − y)/N before it is
rounded to the logits' dtype (far below the 2^-8 / 2^-11 rounding of a bf16 / fp16 gradient), the loss within C·2^-21
absolute (per sample) plus fp32 summation rounding. The interpreter cannot run inline assembly: there ``fast`` uses the same formulas with precise
exp2/log2/division (:func:`use_asm` says which), and the tests check the bound in fp32, bf16 and fp16 that way.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastlivt.kernels.launch import (ACC_TL, interpreter_enabled, kernel_available, launch_args, launch_config, record_launch,
                            use_asm)

__all__ = ["bal_bce_forward", "kernel_available", "interpreter_enabled", "launch_config", "use_asm"]

LN2 = math.log(2.0)


@triton.jit
def _ex2(x, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.math.exp2(x)


@triton.jit
def _lg2(x, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.math.log2(x)


@triton.jit
def _rcp(x, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _terms(x, FAST: tl.constexpr, ASM: tl.constexpr, F64: tl.constexpr):
    """(σ(−|x|), log1p(exp(−|x|)) in the units the accumulator uses: log2 units when FAST, natural otherwise)."""
    if FAST:
        e = _ex2(tl.abs(x) * -1.4426950408889634, ASM)
        u = 1.0 + e
        return e * _rcp(u, ASM), _lg2(u, ASM)
    else:
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        if F64:  # log1p(e) = log(u) · e / (u − 1), exact to rounding (and e itself once 1 + e == 1)
            log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
            return e / u, log1p_e
        else:  # log1p(e) = 2 atanh(t), t = e / (2 + e) <= 1/3: the odd series to t^15 is within 2e-8 (relative)
            t = tl.fdiv(e, 2.0 + e)
            t2 = t * t
            p = t2 * (1.0 / 15.0) + (1.0 / 13.0)
            p = p * t2 + (1.0 / 11.0)
            p = p * t2 + (1.0 / 9.0)
            p = p * t2 + (1.0 / 7.0)
            p = p * t2 + (1.0 / 5.0)
            p = p * t2 + (1.0 / 3.0)
            p = p * t2 + 1.0
            return tl.fdiv(e, u), 2.0 * t * p


@triton.jit
def _chunk(z_row, t_row, y_row, g_row, rel, n_owned, acc_lin, acc_log, off, g_scale, HAS_BIAS: tl.constexpr,
           DENSE: tl.constexpr, WRITE_GRAD: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr, ACC: tl.constexpr,
           MASKED: tl.constexpr):
    """One chunk of owned logits: accumulate the loss terms, store the gradient (y = off unless DENSE)."""
    if MASKED:
        m = rel < n_owned
        x = tl.load(z_row + rel, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
        if HAS_BIAS:
            x += tl.load(t_row + rel, mask=m, other=0.0).to(ACC)
        if DENSE:
            y = tl.load(y_row + rel, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
    else:
        x = tl.load(z_row + rel, eviction_policy="evict_first").to(ACC)
        if HAS_BIAS:
            x += tl.load(t_row + rel).to(ACC)
        if DENSE:
            y = tl.load(y_row + rel, eviction_policy="evict_first").to(ACC)
    if not DENSE:
        y = off
    small, lg = _terms(x, FAST, ASM, ACC == tl.float64)  # small = σ(−|x|)
    lin = tl.maximum(x, 0.0) - x * y
    if MASKED:
        acc_lin += tl.where(m, lin, 0.0)
        acc_log += tl.where(m, lg, 0.0)
    else:
        acc_lin += lin
        acc_log += lg
    if WRITE_GRAD:  # σ(x) − y without cancellation: σ(−|x|) directly, σ(x) = 1 − σ(−x) for x >= 0
        g = (tl.where(x >= 0, (1.0 - y) - small, small - y) * g_scale).to(g_row.dtype.element_ty)
        if MASKED:
            tl.store(g_row + rel, g, mask=m)
        else:
            tl.store(g_row + rel, g)
    return acc_lin, acc_log


@triton.jit
def _bal_bce_kernel(
    z_ptr,  # logits, flat [N·C]
    table_ptr, L,  # bias table [G, L] fp32: table[d, m] = bias[(m + d) mod C] (read only if HAS_BIAS)
    la_ptr, lb_ptr, lam, off, on_minus_off,  # compact target (if not DENSE)
    y_ptr,  # dense target, flat [N·C] (if DENSE)
    grad_ptr,  # out: gradient, flat [N·C], logits' dtype (written only if WRITE_GRAD)
    grad_mul,  # the gradient's factor besides 1/N (the incoming gradient the backward expects)
    part_ptr, count_ptr, loss_ptr,  # per-program partial sums [N], arrival counter [1] (int32, left at 0), loss [1]
    N, C,
    HAS_BIAS: tl.constexpr, DENSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    FAST: tl.constexpr, ASM: tl.constexpr, ACC: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr, ROWS: tl.constexpr, CAND: tl.constexpr, LACC: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid * ROWS  # this program's rows: [row, row + ROWS) (ROWS = 1 on a GPU; many in the interpreter)
    s = row.to(tl.int64) * C  # flat start of the first row
    o0 = ((s + (G - 1)) // G) * G  # first owned vector: the first that starts in these rows
    e = tl.minimum(row + ROWS, N).to(tl.int64) * C
    n_owned = (((e + (G - 1)) // G) * G - o0).to(tl.int32)  # a multiple of G, < ROWS·C + G
    inv_n = 1.0 / tl.cast(N, ACC)
    g_scale = inv_n * grad_mul  # the gradient's factor
    d = (o0 - s).to(tl.int32)  # this row's phase: element o0 + m is class (m + d) mod C
    z_row = z_ptr + o0
    g_row = grad_ptr + o0
    t_row = table_ptr + d * L
    y_row = y_ptr + o0
    acc_lin = tl.zeros([BLOCK], LACC)  # Σ max(x, 0) − x·y   (y = off in the compact form; label terms fixed up below)
    acc_log = tl.zeros([BLOCK], ACC)  # Σ log1p(exp(−|x|))  (in log2 units when FAST)
    n_full = (n_owned // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):  # the steady state: whole chunks, no predicates
        acc_lin, acc_log = _chunk(z_row, t_row, y_row, g_row, k + tl.arange(0, BLOCK), n_owned, acc_lin, acc_log, off,
                                  g_scale, HAS_BIAS, DENSE, WRITE_GRAD, FAST, ASM, ACC, False)
    if n_full < n_owned:  # the last, partial chunk; the predicate is constant over each G-vector (vector accesses)
        acc_lin, acc_log = _chunk(z_row, t_row, y_row, g_row, n_full + tl.arange(0, BLOCK), n_owned, acc_lin, acc_log,
                                  off, g_scale, HAS_BIAS, DENSE, WRITE_GRAD, FAST, ASM, ACC, True)
    lin_sum = tl.sum(acc_lin, axis=0)  # label corrections go here before the log terms join (no absorption)
    if FAST:
        log_sum = tl.sum(acc_log, axis=0) * 0.6931471805599453
    else:
        log_sum = tl.sum(acc_log, axis=0)
    if not DENSE:
        # label fix-up: rows row .. row + ROWS, labels a and b -> candidates; those this program owns are rewritten
        cand = tl.arange(0, CAND)
        crow = row + cand // 2
        row_ok = (crow < N) & (cand < 2 * (ROWS + 1))
        la = tl.load(la_ptr + crow, mask=row_ok, other=0).to(tl.int32)
        lb = tl.load(lb_ptr + crow, mask=row_ok, other=0).to(tl.int32)
        label = tl.where(cand % 2 == 0, la, lb)
        w_cand = tl.where(cand % 2 == 0, lam, 1.0 - lam)
        pos64 = crow.to(tl.int64) * C + label - o0
        own = row_ok & (label >= 0) & (label < C) & (pos64 >= 0) & (pos64 < n_owned)
        pos = tl.where(own, pos64, 0).to(tl.int32)
        xl = tl.load(z_row + pos, mask=own, other=0.0).to(ACC)
        if HAS_BIAS:
            xl += tl.load(table_ptr + label, mask=own, other=0.0).to(ACC)
        yl = off + on_minus_off * (tl.where(label == la, lam, 0.0) + tl.where(label == lb, 1.0 - lam, 0.0)).to(ACC)
        lin_sum -= tl.sum(tl.where(own, (on_minus_off * w_cand).to(LACC) * xl.to(LACC), 0.0), axis=0)
        if WRITE_GRAD:
            small_l, _ = _terms(xl, FAST, ASM, ACC == tl.float64)
            gl = tl.where(xl >= 0, (1.0 - yl) - small_l, small_l - yl)
            tl.debug_barrier()  # the main loop's stores of these elements come first
            tl.store(g_row + pos, (gl * g_scale).to(grad_ptr.dtype.element_ty), mask=own)
        row_loss = lin_sum + log_sum
        mine = row_ok & (cand < 2 * ROWS)  # labels of this program's own rows
        n_bad = tl.sum(tl.where(mine & ((label < 0) | (label >= C)), 1, 0), axis=0)
        row_loss = tl.where(n_bad > 0, float("nan"), row_loss)
    else:
        row_loss = lin_sum + log_sum
    tl.store(part_ptr + pid, row_loss * inv_n)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    n_prog = tl.num_programs(0)
    if arrived == n_prog - 1:  # the last program: add the partials in a fixed order, leave the counter at 0
        offs = tl.arange(0, RBLOCK)
        total = tl.zeros([RBLOCK], ACC)
        for p0 in range(0, n_prog, RBLOCK):
            total += tl.load(part_ptr + p0 + offs, mask=p0 + offs < n_prog, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total, axis=0))
        tl.atomic_xchg(count_ptr, 0)


_TABLES: Dict[tuple, Tuple[torch.Tensor, int, torch.Tensor]] = {}


def bias_table(bias: torch.Tensor, c: int, g: int, rows: int = 1) -> Tuple[torch.Tensor, int]:
    """([G, L] fp32 table with table[d, m] = bias[(m + d) mod C], L ≥ rows·C + G) — once per bias tensor and version.

    The cache holds the bias tensor itself (so its identity cannot be reused while cached) and its version counter
    (an in-place change rebuilds the table); at most 16 entries."""
    length = ((rows * c + g + 15) // 16) * 16  # ≥ the longest owned range; a multiple of 16 (aligned rows)
    key = (id(bias), c, g, rows)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is bias and hit[1] == bias._version:
        return hit[2], length
    if len(_TABLES) >= 16:
        _TABLES.clear()
    idx = (torch.arange(g, device=bias.device)[:, None] + torch.arange(length, device=bias.device)[None, :]) % c
    table = bias.detach().float()[idx].contiguous()
    _TABLES[key] = (bias, bias._version, table)
    return table, length


def bal_bce_forward(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    label_a: Optional[torch.Tensor] = None,
    label_b: Optional[torch.Tensor] = None,
    lam: float = 1.0,
    smoothing: float = 0.0,
    target: Optional[torch.Tensor] = None,
    grad_out: Optional[torch.Tensor] = None,
    write_grad: bool = True,
    grad_scale: float = 1.0,
    fast: Optional[bool] = None,
    config: Optional[Tuple[int, int]] = None,
    rows: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One kernel launch: (loss, ∂loss/∂logits) without autograd.

    logits: [N, C] fp32/bf16/fp16/fp64. bias: τ-scaled logit bias [C] or None. Targets: either ``target`` (dense
    [N, C]) or ``label_a``/``label_b`` [N] with ``lam`` and ``smoothing`` (``label_b`` defaults to ``label_a``).
    ``grad_out``: optional contiguous [N, C] buffer of the logits' dtype for the gradient; ``write_grad=False`` skips
    the gradient (returns None); ``grad_scale``: the number the gradient is multiplied by (besides 1/N). ``fast``:
    the approximate-math path (None: on for bf16/fp16, see the module docstring). ``config``:
    (BLOCK, num_warps) to override :func:`launch_config`; ``rows``: rows per program (default
    :func:`~fastlivt.kernels.launch.rows_per_program`). Returns the loss (fp32 scalar; fp64 for fp64 logits) and
    the gradient.
    """
    args, constexprs, grid, num_warps, keep = launch_args(logits, bias, label_a, label_b, lam, smoothing, target,
                                                          grad_out, write_grad, grad_scale, fast, config, bias_table,
                                                          rows)
    passes = ["logits read"] + (["target read"] if target is not None else [])
    record_launch("bal_bce", passes + (["gradient written"] if keep["grad"] is not None else []))
    _bal_bce_kernel[grid](*args, **constexprs, num_warps=num_warps)
    return keep["loss"], keep["grad"]

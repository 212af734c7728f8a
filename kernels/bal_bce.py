"""Balanced binary cross-entropy fused into one Triton pass (forward and gradient together).

For logits z [N, C], a per-class logit bias b [C] (already multiplied by τ) and soft targets y [N, C]::

    x      = z + b
    loss   = (1/N) Σ_n Σ_c  max(x, 0) − x·y + log1p(exp(−|x|))      (sum over classes, mean over the batch)
    ∂loss/∂z = (σ(x) − y) / N

One program handles ``BLOCK_N`` rows and walks their classes in chunks of ``BLOCK_C``: each logit is read once, the
gradient is written once (in the logits' dtype) into a buffer that ``backward`` hands to autograd, and the per-row
losses (accumulated in fp32, or fp64 for fp64 logits) go to an [N] buffer that one deterministic ``sum`` turns into
the loss. The targets are built inside the kernel from the compact mixup form (label_a, label_b, λ, smoothing)::

    y = λ · smooth(label_a) + (1 − λ) · smooth(label_b),   smooth(k) = one-hot(k) with on = 1 − s + s/C, off = s/C

(timm's ``mixup_target``), so no N × C target tensor exists; a dense-target variant reads y instead. A label outside
[0, C) makes that row's loss NaN (checking it on the host would cost a device synchronisation per step).

``backward`` multiplies the stored gradient by the incoming gradient in place, in a kernel that returns at once when
that gradient is exactly 1 (``loss.backward()``), so the usual step touches the N × C data once in all. A second
backward through a retained graph recomputes the gradient from the saved logits.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET holds a value triton reads as true (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def kernel_available(device: torch.device) -> Tuple[bool, str]:
    """Whether the kernel can run on tensors of ``device``, and why (for logs and benchmark rows)."""
    if device.type == "cuda":
        return True, "logits on CUDA"
    if interpreter_enabled():
        return True, f"TRITON_INTERPRET=1 (logits on {device.type}, Triton interpreter)"
    return False, f"logits on {device.type} and TRITON_INTERPRET is not set (Triton needs CUDA or its interpreter)"


@triton.jit
def _bal_bce_fwd_bwd(
    z_ptr, stride_z,  # logits [N, C], classes contiguous
    bias_ptr,  # τ-scaled bias [C] (read only if HAS_BIAS)
    la_ptr, lb_ptr, lam, one_minus_lam, off, on,  # compact target (if not DENSE)
    y_ptr, stride_y,  # dense target [N, C] (if DENSE)
    grad_ptr, stride_g,  # out: gradient [N, C] in the logits' dtype
    part_ptr,  # out: per-row loss / N, [N] in ACC
    N, C,
    HAS_BIAS: tl.constexpr, DENSE: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    z_rows = z_ptr + rows64 * stride_z
    g_rows = grad_ptr + rows64 * stride_g
    if DENSE:
        y_rows = y_ptr + rows64 * stride_y
    else:
        la = tl.load(la_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        lb = tl.load(lb_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    inv_n = 1.0 / tl.cast(N, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        m = row_ok[:, None] & col_ok[None, :]
        x = tl.load(z_rows[:, None] + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
        if HAS_BIAS:
            x = x + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if DENSE:
            y = tl.load(y_rows[:, None] + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
        else:
            w = tl.where(cols[None, :] == la[:, None], lam, 0.0) + tl.where(cols[None, :] == lb[:, None], one_minus_lam, 0.0)
            y = off + (on - off) * w.to(ACC)
        e = tl.exp(-tl.abs(x))  # in (0, 1]
        u = 1.0 + e
        if F64:  # log1p(e) = log(u) * e / (u - 1), exact to rounding (and e itself once 1 + e == 1)
            log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
            r = 1.0 / u
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
            log1p_e = 2.0 * t * p
            r = tl.fdiv(tl.full([BLOCK_N, BLOCK_C], 1.0, ACC), u)
        acc += tl.where(m, tl.maximum(x, 0.0) - x * y + log1p_e, 0.0)
        # σ(x) − y without cancellation: σ(−|x|) = e/(1 + e), and σ(x) = 1 − σ(−x) for x >= 0
        small = e * r
        diff = tl.where(x >= 0, (1.0 - y) - small, small - y)
        tl.store(g_rows[:, None] + cols[None, :], (diff * inv_n).to(grad_ptr.dtype.element_ty), mask=m)
    row_loss = tl.sum(acc, axis=1) * inv_n
    if not DENSE:
        bad = (la < 0) | (la >= C) | (lb < 0) | (lb >= C)
        row_loss = tl.where(bad, float("nan"), row_loss)
    tl.store(part_ptr + rows, row_loss, mask=row_ok)


@triton.jit
def _scale_unless_one(g_ptr, s_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """g *= s in place; every program returns at once when s == 1."""
    s = tl.load(s_ptr).to(ACC)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        g = tl.load(g_ptr + offs, mask=m).to(ACC)
        tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=m)


def launch_config(n: int, c: int, interpret: Optional[bool] = None) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for N rows of C classes.

    GPU: chunks of up to 2,048 classes (iNat's 8,142 in four) and rows packed together until a tile holds 2,048
    logits, 4 warps — 16 logits per thread (chosen from the compiled instruction count; this layout has not been timed
    on a GPU yet — ``fastlivt bench loss`` reports its fraction of the copy bandwidth). The interpreter runs programs one after another in Python, so there it
    takes few, large tiles (up to 16,384 logits).
    """
    interpret = interpreter_enabled() if interpret is None else interpret
    tile = 16384 if interpret else 2048
    block_c = min(triton.next_power_of_2(c), tile)
    block_n = max(1, min(triton.next_power_of_2(n), tile // block_c))
    return block_n, block_c, 4


def launch_candidates(n: int, c: int) -> List[Tuple[int, int, int]]:
    """The (BLOCK_N, BLOCK_C, num_warps) layouts ``fastlivt bench loss`` times on a GPU besides :func:`launch_config`:
    class chunks of 512 to 4,096, tiles of 2,048 to 8,192 logits, 4 or 8 warps (clamped to the shape, deduplicated)."""
    out: List[Tuple[int, int, int]] = []
    for block_c in (512, 1024, 2048, 4096):
        block_c = min(block_c, triton.next_power_of_2(c))
        for tile in (2048, 4096, 8192):
            block_n = max(1, min(triton.next_power_of_2(n), tile // block_c))
            for warps in (4, 8):
                if block_n * block_c >= 32 * warps and (block_n, block_c, warps) not in out:
                    out.append((block_n, block_c, warps))
    return out


def _check(logits: torch.Tensor, bias: Optional[torch.Tensor], label_a, label_b, target) -> torch.Tensor:
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
    return logits.contiguous()  # a no-op for the usual contiguous head output


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
    config: Optional[Tuple[int, int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One kernel launch: (loss, ∂loss/∂logits) without autograd.

    logits: [N, C] fp32/bf16/fp16/fp64. bias: τ-scaled logit bias [C] or None. Targets: either ``target`` (dense
    [N, C]) or ``label_a``/``label_b`` [N] with ``lam`` and ``smoothing`` (``label_b`` defaults to ``label_a``).
    ``grad_out``: optional contiguous [N, C] buffer of the logits' dtype to write the gradient into. ``config``:
    (BLOCK_N, BLOCK_C, num_warps) to override :func:`launch_config`. Returns the loss (fp32 scalar; fp64 for fp64 logits) and
    the gradient. Non-contiguous logits or targets are copied first.
    """
    if target is None and label_b is None:
        label_b = label_a  # hard labels
    logits = _check(logits, bias, label_a, label_b, target)
    if not (0.0 <= lam <= 1.0) or not (0.0 <= smoothing < 1.0):
        raise ValueError(f"fused Bal-BCE kernel: need 0 <= lam <= 1 and 0 <= smoothing < 1, got lam={lam}, smoothing={smoothing}")
    n, c = logits.shape
    acc_torch = torch.float64 if logits.dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if logits.dtype == torch.float64 else tl.float32
    if grad_out is None:
        grad_out = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    elif grad_out.shape != (n, c) or grad_out.dtype != logits.dtype or not grad_out.is_contiguous():
        raise ValueError(f"fused Bal-BCE kernel: grad_out must be a contiguous [N, C] {logits.dtype} tensor")
    dense = target is not None
    if dense:
        target = target.contiguous()
    off = smoothing / c
    on = 1.0 - smoothing + off
    block_n, block_c, num_warps = config or launch_config(n, c)
    grid = (triton.cdiv(n, block_n),)
    partial = torch.empty(n, dtype=acc_torch, device=logits.device)
    _bal_bce_fwd_bwd[grid](
        logits, logits.stride(0),
        bias if bias is not None else logits,
        label_a if not dense else logits, label_b if not dense else logits, float(lam), 1.0 - float(lam), off, on,
        target if dense else logits, target.stride(0) if dense else 0,
        grad_out, grad_out.stride(0),
        partial,
        n, c,
        HAS_BIAS=bias is not None, DENSE=dense, ACC=acc_tl, F64=logits.dtype == torch.float64,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return partial.sum(), grad_out


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a one-element tensor) in place; costs one launch and no traffic when scale == 1."""
    numel = grad.numel()
    block = min(triton.next_power_of_2(numel), 1 << 16) if interpreter_enabled() else 4096
    acc_tl = tl.float64 if grad.dtype == torch.float64 else tl.float32
    _scale_unless_one[(triton.cdiv(numel, block),)](grad, scale.reshape(()).contiguous(), numel, ACC=acc_tl,
                                                    BLOCK=block, num_warps=4)
    return grad


class BalBCEFunction(torch.autograd.Function):
    """Autograd wrapper: forward launches the fused kernel; backward returns its gradient buffer (scaled)."""

    @staticmethod
    def forward(ctx, logits, bias, label_a, label_b, target, lam, smoothing, config):
        loss, grad = bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                                     target=target, config=config)
        ctx.save_for_backward(logits, bias, label_a, label_b, target)
        ctx.grad = grad
        ctx.args = (lam, smoothing, config)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None  # hand the buffer over; autograd owns it from here
        if grad is None:  # a second backward through a retained graph
            logits, bias, label_a, label_b, target = ctx.saved_tensors
            lam, smoothing, config = ctx.args
            _, grad = bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                                      target=target, config=config)
        scale_grad_(grad, grad_loss)
        return grad, None, None, None, None, None, None, None


def bal_bce(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    label_a: Optional[torch.Tensor] = None,
    label_b: Optional[torch.Tensor] = None,
    lam: float = 1.0,
    smoothing: float = 0.0,
    target: Optional[torch.Tensor] = None,
    config: Optional[Tuple[int, int, int]] = None,
) -> torch.Tensor:
    """The differentiable fused loss: Σ_c BCE(logits + bias, y) averaged over the batch (see the module docstring).

    Give either a dense ``target`` [N, C] or ``label_a`` (and optionally ``label_b``, ``lam``, ``smoothing``);
    hard labels are ``label_a`` alone. Gradients flow to ``logits`` only.
    """
    return BalBCEFunction.apply(logits, bias, label_a, label_b, target, float(lam), float(smoothing), config)

"""The fused Bal-BCE loss as one differentiable custom op, ``torch.ops.fastlivt.bal_bce``, for eager and compiled code.

:func:`bal_bce` is what callers use; eagerly and under ``torch.compile`` alike it calls the op
(``torch.library.custom_op`` with a fake implementation and autograd), so dynamo and CUDA graphs take the loss whole,
without graph breaks, and both paths have the same cost and the same numbers.

Forward: one kernel launch gives the loss and, when the logits need a gradient, ∂loss/∂logits — the logits are read
once and the gradient written once, already multiplied by ``grad_scale``: the gradient the loss's backward will
receive. That is the weight the training runtime gives each micro-batch's loss (``1 / accumulation steps``; 1 for a
plain ``loss.backward()``). The gradient is the op's second output, kept for the backward.

Backward: hands that buffer on as it is — no recomputation and no pass over the N × C gradient. The incoming gradient
lives on the device, so its value cannot be known without a host synchronisation; it is checked there instead
(``torch._assert_async``: one value compared, asynchronous on CUDA): it must equal ``grad_scale`` rounded to the
loss's dtype — what ``(loss / k).backward()`` and ``(loss * w).backward()`` pass for ``grad_scale`` = 1/k (k up to
2^17 at least) or w. Any other incoming gradient — ``loss.backward(g)``, ``(w * loss).backward()`` with
another weight — is an error (a RuntimeError on the CPU, a device-side assertion on CUDA), never a silently wrong
gradient: give the weight as ``grad_scale`` instead. The buffer is not modified, so a second backward through a
retained graph gives the same gradient, eager and compiled.

Where the kernel cannot run (CPU tensors without ``TRITON_INTERPRET=1``) the op computes the same values with PyTorch
ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlivt.kernels.bal_bce import bal_bce_forward
from fastlivt.kernels.launch import kernel_available

OP_NAME = "fastlivt::bal_bce"
SCALE_MISMATCH = ("fastlivt::bal_bce: the incoming gradient differs from grad_scale (the gradient its forward wrote "
                  "is grad_scale x dloss/dlogits); call backward on the loss weighted by grad_scale, or set grad_scale "
                  "to the weight")


def torch_loss_and_grad(logits: Tensor, bias: Optional[Tensor], label_a: Optional[Tensor], label_b: Optional[Tensor],
                        target: Optional[Tensor], lam: float, smoothing: float,
                        grad_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """The same (loss, grad_scale · gradient) with PyTorch ops, in fp32 (fp64 for fp64 logits): the op's path
    without Triton."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    x = x + bias.to(acc) if bias is not None else x
    n, c = x.shape
    if target is None:
        off = smoothing / c
        label_b = label_a if label_b is None else label_b
        y = torch.full_like(x, off)
        y = y + (1.0 - smoothing) * lam * F.one_hot(label_a.long(), c).to(acc)
        y = y + (1.0 - smoothing) * (1.0 - lam) * F.one_hot(label_b.long(), c).to(acc)
    else:
        y = target.to(acc)
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="sum") / n
    grad = ((torch.sigmoid(x) - y) * (grad_scale / n)).to(logits.dtype)
    return loss, grad


@torch.library.custom_op(OP_NAME, mutates_args=())
def bal_bce_op(logits: Tensor, bias: Optional[Tensor], label_a: Optional[Tensor], label_b: Optional[Tensor],
               target: Optional[Tensor], lam: float, smoothing: float, fast: Optional[bool], grad_scale: float,
               write_grad: bool, config: Optional[List[int]]) -> Tuple[Tensor, Tensor]:
    """(loss: a scalar, fp64 for fp64 logits; grad_scale · ∂loss/∂logits in the logits' dtype, or an empty tensor
    without ``write_grad``) in one kernel launch."""
    if kernel_available(logits.device)[0]:
        loss, grad = bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                                     target=target, write_grad=write_grad, grad_scale=grad_scale, fast=fast,
                                     config=tuple(config) if config else None)
    else:
        loss, grad = torch_loss_and_grad(logits, bias, label_a, label_b, target, lam, smoothing, grad_scale)
    return loss, grad if write_grad else logits.new_empty((0,))


@bal_bce_op.register_fake
def _bal_bce_fake(logits, bias, label_a, label_b, target, lam, smoothing, fast, grad_scale, write_grad, config):
    loss = logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return loss, logits.new_empty(logits.shape if write_grad else (0,))


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.grad_scale, ctx.write_grad = inputs[8], inputs[9]


def _backward(ctx, grad_loss: Tensor, _grad_of_grad):
    if not ctx.write_grad:
        raise RuntimeError("fastlivt::bal_bce: backward through a call with write_grad=False (no gradient was written)")
    (grad,) = ctx.saved_tensors
    torch._assert_async(grad_loss == ctx.grad_scale, SCALE_MISMATCH)  # the scale rounds to grad_loss's dtype
    return grad, None, None, None, None, None, None, None, None, None, None


bal_bce_op.register_autograd(_backward, setup_context=_setup_context)


def bal_bce(
    logits: Tensor,
    bias: Optional[Tensor] = None,
    *,
    label_a: Optional[Tensor] = None,
    label_b: Optional[Tensor] = None,
    lam: float = 1.0,
    smoothing: float = 0.0,
    target: Optional[Tensor] = None,
    fast: Optional[bool] = None,
    config: Optional[Tuple[int, int]] = None,
    grad_scale: float = 1.0,
) -> Tensor:
    """The differentiable fused loss: Σ_c BCE(logits + bias, y) averaged over the batch (see :mod:`fastlivt.kernels.bal_bce`).

    Give either a dense ``target`` [N, C] or ``label_a`` (and optionally ``label_b``, ``lam``, ``smoothing``);
    hard labels are ``label_a`` alone. Gradients flow to ``logits`` only. ``fast``: approximate PTX math (None: on
    for bf16/fp16 logits). ``config``: (BLOCK, num_warps). ``grad_scale``: the gradient the loss's backward will
    receive (the weight its caller gives the loss before ``backward``; see the module docstring).
    """
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.fastlivt.bal_bce(logits, bias, label_a, label_b, target, float(lam), float(smoothing), fast,
                                         float(grad_scale), write_grad, list(config) if config else None)
    return loss

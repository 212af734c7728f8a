"""The fused Bal-BCE loss as a differentiable function, and as custom ops for compiled graphs.

:func:`bal_bce` is what callers use. Eagerly it runs :class:`BalBCEFunction`: the forward launches the kernel once
(loss and gradient); the first backward hands that gradient to autograd as it is when the incoming gradient is the
1 of ``loss.backward()``, and otherwise after :func:`kernels.bal_bce.scale_grad_` (one launch, the scale read on
the device); a second backward through a retained graph recomputes the gradient. The incoming gradient lives on the
device, so its value cannot be known without a host synchronisation; its *identity* can: the returned loss carries
a ``backward`` that passes :func:`unit_gradient` (one cached 1 per device and dtype) instead of a fresh ``ones_like``
(:class:`FusedLoss`), and the backward recognises that tensor. So ``loss.backward()`` costs one launch in all; ``loss.backward(g)``,
``(loss / k).backward()`` and ``torch.autograd.grad`` stay exact at one launch more.

Under ``torch.compile`` it calls the custom op ``torch.ops.fastlivt.bal_bce`` (``torch.library.custom_op``: the loss
in one launch, fake implementation, autograd), so dynamo and CUDA graphs take the loss whole, without graph breaks.
Its backward is the op ``torch.ops.fastlivt.bal_bce_grad``: the gradient recomputed in one launch, multiplied by
grad_output on the device — functional (safe for retained graphs) and one read + one write of N × C, where saving the
forward's gradient would cost a write in the forward and a read + write to scale it. Where the kernel cannot run (CPU
tensors without ``TRITON_INTERPRET=1``) both ops compute the same values with PyTorch ops.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels.bal_bce import bal_bce_forward, scale_grad_
from kernels.launch import kernel_available

OP_NAME = "fastlivt::bal_bce"
_UNITS: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}


def unit_gradient(like: Tensor) -> Tensor:
    """The 1 that ``loss.backward()`` passes down from a fused loss: one cached tensor per device and dtype, which the
    backward recognises by identity (never written: autograd does not modify incoming gradients)."""
    key = (like.device, like.dtype)
    if key not in _UNITS:
        _UNITS[key] = torch.ones((), device=like.device, dtype=like.dtype)
    return _UNITS[key]


def _is_unit(grad: Tensor) -> bool:
    return _UNITS.get((grad.device, grad.dtype)) is grad


class FusedLoss(Tensor):
    """The scalar a fused loss returns: a plain tensor (operations on it give ``torch.Tensor``s) whose
    ``backward()`` passes :func:`unit_gradient` as the default gradient, so the kernel's gradient goes on unscaled."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def backward(self, gradient: Optional[Tensor] = None, retain_graph=None, create_graph: bool = False, inputs=None):
        if gradient is None:
            gradient = unit_gradient(self)
        return Tensor.backward(self, gradient, retain_graph, create_graph, inputs=inputs)


def torch_loss_and_grad(logits: Tensor, bias: Optional[Tensor], label_a: Optional[Tensor], label_b: Optional[Tensor],
                        target: Optional[Tensor], lam: float, smoothing: float) -> Tuple[Tensor, Tensor]:
    """The same (loss, gradient) with PyTorch ops, in fp32 (fp64 for fp64 logits): the op's path without Triton."""
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
    grad = ((torch.sigmoid(x) - y) / n).to(logits.dtype)
    return loss, grad


@torch.library.custom_op(OP_NAME, mutates_args=())
def bal_bce_op(logits: Tensor, bias: Optional[Tensor], label_a: Optional[Tensor], label_b: Optional[Tensor],
               target: Optional[Tensor], lam: float, smoothing: float, fast: Optional[bool]) -> Tensor:
    """The fused loss (a scalar; fp64 for fp64 logits), no gradient pass."""
    if kernel_available(logits.device)[0]:
        return bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                               target=target, write_grad=False, fast=fast)[0]
    return torch_loss_and_grad(logits, bias, label_a, label_b, target, lam, smoothing)[0]


@torch.library.custom_op(OP_NAME + "_grad", mutates_args=())
def bal_bce_grad_op(logits: Tensor, bias: Optional[Tensor], label_a: Optional[Tensor], label_b: Optional[Tensor],
                    target: Optional[Tensor], lam: float, smoothing: float, fast: Optional[bool],
                    grad_loss: Tensor) -> Tensor:
    """∂loss/∂logits · grad_loss in the logits' dtype (grad_loss: one value, read on the device)."""
    if kernel_available(logits.device)[0]:
        return bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                               target=target, grad_scale=grad_loss.reshape(1), fast=fast)[1]
    grad = torch_loss_and_grad(logits, bias, label_a, label_b, target, lam, smoothing)[1]
    return (grad.to(grad_loss.dtype) * grad_loss).to(logits.dtype)


@bal_bce_op.register_fake
def _bal_bce_fake(logits, bias, label_a, label_b, target, lam, smoothing, fast):
    return logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


@bal_bce_grad_op.register_fake
def _bal_bce_grad_fake(logits, bias, label_a, label_b, target, lam, smoothing, fast, grad_loss):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, bias, label_a, label_b, target, lam, smoothing, fast = inputs
    ctx.save_for_backward(logits, bias, label_a, label_b, target)
    ctx.args = (lam, smoothing, fast)


def _backward(ctx, grad_loss: Tensor):
    logits, bias, label_a, label_b, target = ctx.saved_tensors
    grad = torch.ops.fastlivt.bal_bce_grad(logits, bias, label_a, label_b, target, *ctx.args, grad_loss)
    return grad, None, None, None, None, None, None, None


bal_bce_op.register_autograd(_backward, setup_context=_setup_context)


class BalBCEFunction(torch.autograd.Function):
    """Eager autograd wrapper: forward launches the fused kernel; backward returns its gradient buffer (scaled)."""

    @staticmethod
    def forward(ctx, logits, bias, label_a, label_b, target, lam, smoothing, fast, config):
        loss, grad = bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                                     target=target, write_grad=ctx.needs_input_grad[0], fast=fast, config=config)
        ctx.save_for_backward(logits, bias, label_a, label_b, target)
        ctx.grad = grad
        ctx.args = (lam, smoothing, fast, config)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None  # hand the buffer over; autograd owns it from here
        if grad is None:  # a second backward through a retained graph
            logits, bias, label_a, label_b, target = ctx.saved_tensors
            lam, smoothing, fast, config = ctx.args
            _, grad = bal_bce_forward(logits, bias, label_a=label_a, label_b=label_b, lam=lam, smoothing=smoothing,
                                      target=target, fast=fast, config=config)
        if not _is_unit(grad_loss):
            scale_grad_(grad, grad_loss)
        return grad, None, None, None, None, None, None, None, None


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
) -> Tensor:
    """The differentiable fused loss: Σ_c BCE(logits + bias, y) averaged over the batch (see :mod:`kernels.bal_bce`).

    Give either a dense ``target`` [N, C] or ``label_a`` (and optionally ``label_b``, ``lam``, ``smoothing``);
    hard labels are ``label_a`` alone. Gradients flow to ``logits`` only. ``fast``: approximate PTX math (None: on
    for bf16/fp16 logits). ``config``: (BLOCK, num_warps), eager only.
    """
    if torch.compiler.is_compiling():
        return torch.ops.fastlivt.bal_bce(logits, bias, label_a, label_b, target, float(lam), float(smoothing), fast)
    loss = BalBCEFunction.apply(logits, bias, label_a, label_b, target, float(lam), float(smoothing), fast, config)
    return loss.as_subclass(FusedLoss) if loss.requires_grad else loss  # loss.backward(): no second launch

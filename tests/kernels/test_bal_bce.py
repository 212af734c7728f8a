"""The fused Balanced-BCE Triton kernel against a float64 PyTorch reference (CPU: Triton interpreter; GPU: marked cuda).

Errors are norm-wise relative errors ‖a − b‖ / ‖b‖ of the loss and of the whole gradient. Inputs of the reference
are the very logits the kernel sees (a bf16 input is upcast exactly), so only the kernel's arithmetic is measured.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastlivt.kernels.bal_bce import bal_bce_forward, kernel_available
from fastlivt.kernels.bal_bce_op import bal_bce
from fastlivt.kernels.launch import launch_candidates
from fastlivt.kernels.reference import bal_bce_reference, soft_target

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-9}

needs_kernel = pytest.mark.skipif(not kernel_available(torch.device("cpu"))[0],
                                  reason=f"the kernel cannot run on CPU here: {kernel_available(torch.device('cpu'))[1]}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make(n: int, c: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, c, generator=g)).to(dtype)
    bias = 4.0 * torch.randn(c, generator=g)
    la = torch.randint(0, c, (n,), generator=g)
    lb = torch.randint(0, c, (n,), generator=g)
    return logits.to(device), bias.to(device), la.to(device), lb.to(device)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c", [(1, 8142), (3, 8142), (7, 5), (33, 1000), (5, 365)])
def test_compact_target_matches_float64_reference(dtype, n, c):
    logits, bias, la, lb = make(n, c, dtype, seed=n + c)
    loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1)
    ref_loss, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.7, 0.1, c))
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == (n, c)
    assert rel(loss, ref_loss) <= TOL[dtype]
    assert rel(grad, ref_grad) <= TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_target_matches_reference_and_small_blocks_cover_tails(dtype):
    # chunks of 64 logits over rows of 150: whole chunks (the unpredicated loop), then a partial last chunk
    n, c = 7, 150
    logits, bias, la, lb = make(n, c, dtype, seed=3)
    target = torch.rand(n, c, generator=torch.Generator().manual_seed(9))
    for config in [None, (64, 4)]:
        loss, grad = bal_bce_forward(logits, bias, target=target, config=config)
        ref_loss, ref_grad = bal_bce_reference(logits, bias, target)
        assert rel(loss, ref_loss) <= TOL[dtype] and rel(grad, ref_grad) <= TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("config", [None, (64, 4)])
def test_every_gradient_element_is_written(config):
    n, c = 9, 200
    logits, bias, la, lb = make(n, c, torch.float32, seed=4)
    poisoned = torch.full((n, c), float("nan"))
    _, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.4, smoothing=0.2, grad_out=poisoned, config=config)
    assert grad.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(grad).all()
    _, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.4, 0.2, c))
    assert rel(grad, ref_grad) <= 1e-6


@needs_kernel
def test_every_benchmarked_launch_layout_computes_the_same_loss_and_gradient():
    # the layouts `fastlivt bench loss` sweeps on a GPU: chunks that split a row and leave a partial last chunk
    n, c = 9, 1500
    configs = launch_candidates(n, c)
    assert len(configs) >= 4 and any(block < c for block, _ in configs) and any(block > c for block, _ in configs)
    logits, bias, la, lb = make(n, c, torch.float32, seed=8)
    ref_loss, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.3, 0.1, c))
    for config in configs:
        poisoned = torch.full((n, c), float("nan"))
        loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.3, smoothing=0.1, grad_out=poisoned,
                                     config=config)
        assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6, config


def finite_difference_check(fn, x: torch.Tensor, eps: float = 1e-6) -> float:
    """max |autograd gradient − central difference| of scalar ``fn`` at float64 ``x`` (torch's gradcheck, less its
    test that the backward multiplies by any grad_output: the fused op refuses weights other than grad_scale)."""
    z = x.detach().clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(fn(z), z)
    numeric = torch.empty_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            step = torch.zeros_like(x).view(-1)
            step[i] = eps
            step = step.view_as(x)
            numeric.view(-1)[i] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return float((analytic - numeric).abs().max())


@needs_kernel
def test_gradient_matches_finite_differences_in_float64():
    logits, bias, la, lb = make(3, 6, torch.float64, seed=5, scale=2.0)
    assert finite_difference_check(lambda x: bal_bce(x, bias, label_a=la, label_b=lb, lam=0.6, smoothing=0.1),
                                   logits) <= 1e-8
    target = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert finite_difference_check(lambda x: bal_bce(x, bias, target=target), logits) <= 1e-8
    assert finite_difference_check(lambda x: 4.0 * bal_bce(x, bias, target=target, grad_scale=4.0), logits) <= 4e-8


@needs_kernel
def test_backward_hands_on_the_gradient_weighted_in_the_forward_and_survives_retain_graph():
    logits, bias, la, lb = make(6, 40, torch.float32, seed=7)
    _, ref_grad = bal_bce_reference(logits, bias, soft_target(la, la, 1.0, 0.0, 40))
    z = logits.clone().requires_grad_(True)
    loss = bal_bce(z, bias, label_a=la, grad_scale=2.5)
    (g1,) = torch.autograd.grad(2.5 * loss, z, retain_graph=True)  # the weight declared: the forward's gradient
    (g2,) = torch.autograd.grad(loss * 2.5, z)  # a second backward through the retained graph: the same buffer
    assert rel(g1, 2.5 * ref_grad) <= 1e-6 and torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="differs from grad_scale"):  # another weight: refused, never wrong
        torch.autograd.grad(bal_bce(z, bias, label_a=la, grad_scale=2.5), z)


@needs_kernel
def test_extreme_priors_stay_finite():
    from fastlivt.losses import logit_bias

    # iNat18-like: 8,142 classes, 437,513 images, the rarest class has 1 image (pi = 1/437,513)
    c = 8142
    counts = [1] + [437_512 // (c - 1)] * (c - 1)
    counts[1] += 437_512 - sum(counts[1:])
    assert sum(counts) == 437_513
    bias = logit_bias(counts, "bal_bce")
    logits = torch.cat([torch.full((1, c), 60.0), torch.full((1, c), -60.0), 5 * torch.randn(1, c)]).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2])
    loss, grad = bal_bce_forward(logits, bias, label_a=labels, label_b=labels.flip(0), lam=0.5, smoothing=0.1)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    # two classes, 99.9 % in one: pi = 0.999 and 0.001
    bias2 = logit_bias([999, 1], "bal_bce")
    logits2 = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]])
    loss2, grad2 = bal_bce_forward(logits2, bias2, label_a=torch.tensor([0, 1, 1]))
    ref_loss2, ref_grad2 = bal_bce_reference(logits2, bias2, soft_target(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 1.0, 0.0, 2))
    assert math.isfinite(loss2.item()) and torch.isfinite(grad2).all()
    assert rel(loss2, ref_loss2) <= 1e-6 and rel(grad2, ref_grad2) <= 1e-6


@needs_kernel
@pytest.mark.parametrize("margin", [0.01, 5.0, 20.0, 80.0])
def test_confident_logits_keep_relative_accuracy(margin):
    # every per-element loss and gradient is tiny (e^-margin): no cancellation in log1p or in sigmoid(x) - y
    n, c = 16, 300
    la = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(11))
    z = torch.full((n, c), -margin) + 0.3 * torch.rand(n, c, generator=torch.Generator().manual_seed(12))
    z[torch.arange(n), la] += 2 * margin
    loss, grad = bal_bce_forward(z, None, label_a=la)
    ref_loss, ref_grad = bal_bce_reference(z, None, soft_target(la, la, 1.0, 0.0, c))
    assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6


@needs_kernel
def test_compact_equals_dense_equals_timm_mixup_target():
    from timm.data.mixup import mixup_target

    from fastlivt.targets import MixTarget

    n, c, lam, s = 8, 100, 0.35, 0.1
    logits, bias, la, _ = make(n, c, torch.float32, seed=8)
    timm_y = mixup_target(la, c, lam=lam, smoothing=s)  # timm mixes each sample with the flipped batch
    mix = MixTarget(la, la.flip(0), lam, s)
    assert torch.equal(mix.dense(c), timm_y)
    loss_c, grad_c = bal_bce_forward(logits, bias, label_a=mix.label_a, label_b=mix.label_b, lam=lam, smoothing=s)
    loss_d, grad_d = bal_bce_forward(logits, bias, target=timm_y)
    assert rel(loss_c, loss_d) <= 1e-7 and rel(grad_c, grad_d) <= 1e-7


@needs_kernel
def test_out_of_range_label_makes_the_loss_nan():
    logits, bias, la, _ = make(4, 10, torch.float32, seed=10)
    la[2] = 10
    loss, _ = bal_bce_forward(logits, bias, label_a=la, label_b=la)
    assert math.isnan(loss.item())


@needs_kernel
def test_bad_inputs_are_named():
    logits, bias, la, _ = make(4, 10, torch.float32)
    with pytest.raises(ValueError, match="bias has shape"):
        bal_bce_forward(logits, bias[:5], label_a=la, label_b=la)
    with pytest.raises(ValueError, match="label_a must be"):
        bal_bce_forward(logits, bias, label_a=la[:3], label_b=la)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        bal_bce_forward(logits[0], bias, label_a=la, label_b=la)
    with pytest.raises(ValueError, match="lam"):
        bal_bce_forward(logits, bias, label_a=la, label_b=la, lam=1.5)


def test_kernel_availability_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = kernel_available(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in why
    with pytest.raises(RuntimeError, match="fused='torch'"):
        bal_bce_forward(torch.zeros(2, 3), label_a=torch.zeros(2, dtype=torch.long), label_b=torch.zeros(2, dtype=torch.long))
    assert kernel_available(torch.device("cuda"))[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastlivt.kernels.launch import interpreter_problem

    ok, why = kernel_available(torch.device("cpu"))
    assert ok == (interpreter_problem() == "")  # the interpreter runs it unless its probe fails (triton 3.6, numpy 2.4+)
    assert ok or ("TRITON_INTERPRET=1 but" in why and interpreter_problem() in why)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c", [(1024, 8142), (1, 8142), (1000, 365), (37, 1000)])
def test_cuda_kernel_matches_float64_reference(dtype, n, c):
    logits, bias, la, lb = make(n, c, dtype, seed=n + c, device="cuda")
    poisoned = torch.full((n, c), float("nan"), dtype=dtype, device="cuda")
    loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1, grad_out=poisoned)
    ref_loss, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.7, 0.1, c))
    assert torch.isfinite(grad).all()
    assert rel(loss, ref_loss) <= TOL[dtype] and rel(grad, ref_grad) <= TOL[dtype]
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(3.0 * bal_bce(z, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1, grad_scale=3.0), z)
    assert rel(g, 3.0 * ref_grad) <= TOL[dtype]


@pytest.mark.cuda
def test_cuda_gradient_matches_finite_differences_in_float64():
    logits, bias, la, lb = make(3, 6, torch.float64, seed=5, scale=2.0, device="cuda")
    assert finite_difference_check(lambda x: bal_bce(x, bias, label_a=la, label_b=lb, lam=0.6, smoothing=0.1),
                                   logits) <= 1e-8


def test_an_interpreter_that_cannot_run_the_kernel_makes_it_unavailable_with_the_reason(monkeypatch):
    import fastlivt.kernels.launch as launch
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch, "interpreter_problem", lambda: "triton 3.6's interpreter cannot run the kernel (probe)")
    ok, why = launch.kernel_available(torch.device("cpu"))
    assert not ok and "cannot run the kernel (probe)" in why
    assert launch.kernel_available(torch.device("cuda")) == (True, "logits on CUDA")
    loss = build_loss(LossConfig(name="bal_bce"), [5, 3, 1])
    assert loss.backend_for(torch.device("cpu")) == ("torch", why)  # the plain PyTorch loss, with the reason logged

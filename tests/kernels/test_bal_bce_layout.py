"""fastlivt.kernels.bal_bce beyond the reference comparison of test_bal_bce.py: the flat vector layout, label fix-up,
fast-math path, last-program reduction, one launch per call, in-pass gradient scaling and the bias table
(CPU: Triton interpreter; the float64 reference of kernels/reference.py is the yardstick)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastlivt.kernels.bal_bce import bal_bce_forward, kernel_available
from fastlivt.kernels.launch import LAUNCHES, counter_for, vector_width
from fastlivt.kernels.reference import bal_bce_reference, soft_target

needs_kernel = pytest.mark.skipif(not kernel_available(torch.device("cpu"))[0],
                                  reason=f"the kernel cannot run on CPU here: {kernel_available(torch.device('cpu'))[1]}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make(n: int, c: int, dtype: torch.dtype, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, c, generator=g)).to(dtype)
    bias = 4.0 * torch.randn(c, generator=g)
    return logits, bias, torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)


@needs_kernel
def test_fast_is_refused_for_float64():
    logits, bias, la, lb = make(2, 6, torch.float64, seed=0)
    with pytest.raises(ValueError, match="float64"):
        bal_bce_forward(logits, bias, label_a=la, fast=True)


def check_fast_bound(dtype: torch.dtype, n: int, c: int, config, device: str = "cpu") -> None:
    # bound (module docstring): gradient within 2^-20 of σ(x) − y before rounding to the logits' dtype (one unit in
    # the last place here: the interpreter's conversion truncates, a GPU's rounds to nearest); loss within C·2^-21
    # per sample plus fp32 summation rounding
    logits, bias, la, lb = make(n, c, dtype, seed=n * c)
    logits, bias, la, lb = logits.to(device), bias.to(device), la.to(device), lb.to(device)
    for scale in (1.0, 30.0):  # scale 30: most e^-|x| below 2^-24, where log2(1 + e) loses e entirely
        z = (logits.float() * scale / 3.0).to(dtype)
        loss, grad = bal_bce_forward(z, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1, fast=True, config=config)
        ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.7, 0.1, c))
        assert abs(loss.item() - ref_loss.item()) <= c * 2.0 ** -21 + 1e-6 * abs(ref_loss.item())
        rounding = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
        err = (grad.double() - ref_grad).abs()
        assert bool((err <= (2.0 ** -20 / n) + rounding * ref_grad.abs() * 1.01).all()), float(err.max())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c,config", [(8, 1000, (256, 4)), (3, 8142, (2048, 4)), (7, 5, None)])
def test_fast_path_within_its_stated_bound(dtype, n, c, config):
    check_fast_bound(dtype, n, c, config)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c", [(1024, 8142), (37, 1000), (5, 7)])
def test_cuda_fast_path_with_hardware_approximations_within_its_bound(dtype, n, c):
    check_fast_bound(dtype, n, c, None, device="cuda")  # ex2/lg2/rcp.approx: the bound includes their error


@pytest.mark.cuda
def test_cuda_forward_is_one_device_kernel():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    logits, bias, la, lb = (t.cuda() for t in make(1024, 8142, torch.bfloat16, seed=1))
    bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1)  # builds the bias table once
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss, _ = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.7, smoothing=0.1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    ref_loss, _ = bal_bce_reference(logits, bias, soft_target(la, lb, 0.7, 0.1, 8142))
    assert abs(loss.item() - ref_loss.item()) <= 8142 * 2.0 ** -21 + 1e-5 * abs(ref_loss.item())


@needs_kernel
@pytest.mark.parametrize("n,c", [(8, 13), (5, 12), (9, 7), (7, 5), (4, 3), (6, 130)])
@pytest.mark.parametrize("config,rows", [(None, None), ((16, 1), 1), ((16, 1), 3)])
def test_labels_at_row_and_vector_boundaries_are_fixed_up(n, c, config, rows):
    # the first and last class of each row sit in vectors owned by the previous row's program (rows=1: the GPU's
    # one row per program; rows=3 and the interpreter's default: several rows per program)
    if config is not None and config[0] < vector_width(n, c):
        pytest.skip("block below the vector width")
    logits, bias, _, _ = make(n, c, torch.float32, seed=c)
    la = torch.tensor([0, c - 1] * n)[:n]
    lb = torch.tensor([c - 1, 0, 0] * n)[:n]  # some rows mix a label with itself (la == lb)
    for lam, s in [(0.3, 0.1), (1.0, 0.0), (0.5, 0.0)]:
        poisoned = torch.full((n, c), float("nan"))
        loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=lam, smoothing=s, grad_out=poisoned,
                                     config=config, rows=rows)
        ref_loss, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, lam, s, c))
        assert torch.isfinite(grad).all()
        assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6, (lam, s)


@needs_kernel
def test_unaligned_rows_every_vector_width_and_multi_chunk_rows():
    # G = 8, 4, 2, 1, each with chunks shorter than a row (the unpredicated loop) and a partial last chunk
    for (n, c), rows in itertools.product([(16, 150), (4, 150), (2, 150), (3, 151)], [1, 2, None]):
        logits, bias, la, lb = make(n, c, torch.bfloat16, seed=n + c)
        poisoned = torch.full((n, c), float("nan"), dtype=torch.bfloat16)
        loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.6, smoothing=0.1, grad_out=poisoned,
                                     config=(32, 1), rows=rows)
        ref_loss, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.6, 0.1, c))
        assert torch.isfinite(grad).all(), (n, c, rows)
        assert rel(loss, ref_loss) <= 1e-2 and rel(grad, ref_grad) <= 1e-2, (n, c, rows)


@needs_kernel
def test_one_launch_gives_the_scalar_loss_and_leaves_the_counter_at_zero():
    logits, bias, la, lb = make(6, 40, torch.float32, seed=3)
    before = sum(LAUNCHES.values())
    loss1, _ = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.4)
    assert sum(LAUNCHES.values()) - before == 1 and loss1.dim() == 0
    assert int(counter_for(logits.device).item()) == 0  # the last program reset it: the next call starts clean
    loss2, _ = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.4)
    assert torch.equal(loss1, loss2)  # partials added in a fixed order: bit-identical
    loss3, grad3 = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.4, write_grad=False)
    assert grad3 is None and torch.equal(loss1, loss3)


@needs_kernel
def test_bad_label_in_one_row_makes_only_the_loss_nan_and_writes_no_other_row():
    logits, bias, la, lb = make(4, 10, torch.float32, seed=6)
    la[1] = 12  # would point into row 2 if it were used as a position
    good = torch.tensor([0, 2, 3])
    _, ref_grad = bal_bce_reference(logits[good], bias, soft_target(la[good], lb[good], 0.5, 0.0, 10))
    for rows in (1, 2, None):
        loss, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.5, rows=rows)
        assert math.isnan(loss.item())
        assert rel(grad[good] * 4 / 3, ref_grad) <= 1e-6  # rows 0, 2, 3 untouched by the bad label (1/N differs)


@needs_kernel
def test_grad_scale_multiplies_the_gradient_in_the_same_pass():
    logits, bias, la, lb = make(4, 50, torch.float32, seed=7)
    _, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.25, 0.05, 50))
    for scale in (-2.5, 0.0, 1.0, 1.0 / 3):
        _, grad = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.25, smoothing=0.05, grad_scale=scale,
                                  config=(16, 1))
        if scale == 0.0:
            assert not grad.any()
        else:
            assert rel(grad, scale * ref_grad) <= 1e-6, scale
    with pytest.raises(ValueError, match="grad_scale"):
        bal_bce_forward(logits, bias, label_a=la, grad_scale=float("nan"))


@needs_kernel
def test_bias_table_follows_in_place_changes_and_new_tensors():
    logits, bias, la, lb = make(3, 20, torch.float32, seed=8)
    loss1, _ = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.5)
    bias.add_(1.0)  # in place: same tensor, new version
    loss2, grad2 = bal_bce_forward(logits, bias, label_a=la, label_b=lb, lam=0.5)
    ref_loss2, ref_grad2 = bal_bce_reference(logits, bias, soft_target(la, lb, 0.5, 0.0, 20))
    assert not torch.equal(loss1, loss2) and rel(loss2, ref_loss2) <= 1e-6 and rel(grad2, ref_grad2) <= 1e-6
    other = bias - 2.0  # a different tensor
    loss3, _ = bal_bce_forward(logits, other, label_a=la, label_b=lb, lam=0.5)
    assert rel(loss3, bal_bce_reference(logits, other, soft_target(la, lb, 0.5, 0.0, 20))[0]) <= 1e-6

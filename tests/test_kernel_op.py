"""The fused loss as the torch.library custom ops ``fastlivt::bal_bce`` (loss, with autograd) and
``fastlivt::bal_bce_grad`` (its backward): registration checks, fake tensors, and torch.compile(fullgraph=True)
without graph breaks — with the kernel (interpreter) and with the ops' PyTorch path (TRITON_INTERPRET off)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from kernels.bal_bce import interpreter_enabled
from kernels.bal_bce_op import bal_bce, torch_loss_and_grad
from kernels.reference import bal_bce_reference, soft_target

needs_kernel = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make(n: int = 4, c: int = 37, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, c, generator=g), torch.randn(c, generator=g), torch.randint(0, c, (n,), generator=g),
            torch.randint(0, c, (n,), generator=g))


def loss_fn(z, bias, la, lb):
    return bal_bce(z, bias, label_a=la, label_b=lb, lam=0.3, smoothing=0.1)


def test_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(8, 5, dtype=torch.bfloat16)
        labels = torch.zeros(8, dtype=torch.long)
        loss = torch.ops.fastlivt.bal_bce(z, torch.empty(5), labels, None, None, 0.5, 0.1, None)
        assert loss.shape == () and loss.dtype == torch.float32
        grad = torch.ops.fastlivt.bal_bce_grad(z, None, labels, labels, None, 1.0, 0.0, None, torch.ones(()))
        assert grad.shape == (8, 5) and grad.dtype == torch.bfloat16
        assert torch.ops.fastlivt.bal_bce(z.double(), None, labels, None, None, 1.0, 0.0, None).dtype == torch.float64


@needs_kernel
def test_opcheck_passes():
    z, bias, la, lb = make(3, 9)
    torch.library.opcheck(torch.ops.fastlivt.bal_bce.default, (z.requires_grad_(True), bias, la, lb, None, 0.3, 0.1,
                                                               None))
    torch.library.opcheck(torch.ops.fastlivt.bal_bce_grad.default, (z.detach(), bias, la, lb, None, 0.3, 0.1, None,
                                                                    torch.tensor(2.0)))


@needs_kernel
def test_compiled_fullgraph_has_no_graph_breaks_and_matches_eager():
    z, bias, la, lb = make()
    explained = torch._dynamo.explain(loss_fn)(z.clone().requires_grad_(True), bias, la, lb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert any("fastlivt.bal_bce" in str(node.target) for g in explained.graphs for node in g.graph.nodes)
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, z.shape[1]))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    zc = z.clone().requires_grad_(True)
    loss = compiled(zc, bias, la, lb)
    loss.backward(torch.tensor(2.0), retain_graph=True)  # grad_output != 1 through the op's autograd
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, 2.0 * ref_grad) <= 1e-6
    (again,) = torch.autograd.grad(loss, zc)  # second backward through the retained graph
    assert rel(again, ref_grad) <= 1e-6


def test_op_pytorch_path_without_triton_compiles_without_breaks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel is unavailable: the op computes with PyTorch ops
    z, bias, la, lb = make(5, 11, seed=2)

    def fn(x):
        return torch.ops.fastlivt.bal_bce(x, bias, la, lb, None, 0.3, 0.1, None)

    explained = torch._dynamo.explain(fn)(z.clone().requires_grad_(True))
    assert explained.graph_break_count == 0
    zc = z.clone().requires_grad_(True)
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(zc)
    loss.backward(torch.tensor(0.5))
    ref_grad_scale = 0.5
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, 11))
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, ref_grad_scale * ref_grad) <= 1e-6


def test_pytorch_path_matches_reference_for_dense_and_hard_targets():
    z, bias, la, _ = make(6, 13, seed=3)
    target = torch.rand(6, 13, generator=torch.Generator().manual_seed(4))
    for kw, y in [((None, None, target), target), ((la, None, None), soft_target(la, la, 1.0, 0.2, 13))]:
        loss, grad = torch_loss_and_grad(z, bias, *kw, 1.0, 0.2)
        ref_loss, ref_grad = bal_bce_reference(z, bias, y)
        assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6


@needs_kernel
def test_inductor_fullgraph_takes_the_ops_whole():
    z, bias, la, lb = make(3, 21, seed=5)
    torch._dynamo.reset()
    zc = z.clone().requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True)(zc, bias, la, lb)  # Inductor: the ops stay opaque calls
    loss.backward()
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, 21))
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, ref_grad) <= 1e-6

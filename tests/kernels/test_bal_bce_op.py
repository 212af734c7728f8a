"""The fused loss as one torch.library custom op, ``fastlivt::bal_bce`` (loss and gradient in one launch, the gradient
kept for the backward): registration checks, fake tensors, torch.compile(fullgraph=True) without graph breaks — with
the kernel (interpreter) and with the op's PyTorch path (TRITON_INTERPRET off) — and the training path's launches."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

from fastlivt.kernels.bal_bce import interpreter_enabled
from fastlivt.kernels.bal_bce_op import bal_bce, torch_loss_and_grad
from fastlivt.kernels.launch import LAUNCHES, PASSES
from fastlivt.kernels.reference import bal_bce_reference, soft_target

needs_kernel = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make(n: int = 4, c: int = 37, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, c, generator=g), torch.randn(c, generator=g), torch.randint(0, c, (n,), generator=g),
            torch.randint(0, c, (n,), generator=g))


def make_case(n: int, c: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n, c, generator=g)).to(dtype)
    bias = 4.0 * torch.randn(c, generator=g)
    return logits, bias, torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)


def loss_fn(z, bias, la, lb, grad_scale=1.0):
    return bal_bce(z, bias, label_a=la, label_b=lb, lam=0.3, smoothing=0.1, grad_scale=grad_scale)


def test_op_is_registered_with_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(8, 5, dtype=torch.bfloat16)
        labels = torch.zeros(8, dtype=torch.long)
        loss, grad = torch.ops.fastlivt.bal_bce(z, torch.empty(5), labels, None, None, 0.5, 0.1, None, 0.5, True, None)
        assert loss.shape == () and loss.dtype == torch.float32
        assert grad.shape == (8, 5) and grad.dtype == torch.bfloat16 and grad.is_contiguous()
        _, none = torch.ops.fastlivt.bal_bce(z, None, labels, None, None, 1.0, 0.0, None, 1.0, False, None)
        assert none.shape == (0,)
        loss64, _ = torch.ops.fastlivt.bal_bce(z.double(), None, labels, None, None, 1.0, 0.0, None, 1.0, False, None)
        assert loss64.dtype == torch.float64


@needs_kernel
def test_opcheck_passes():
    # schema, autograd registration and fake tensors; AOT dispatch is left to the compiled tests below: opcheck
    # backpropagates random incoming gradients, which the op refuses by design (they are not its grad_scale)
    z, bias, la, lb = make(3, 9)
    for write_grad in (True, False):
        torch.library.opcheck(torch.ops.fastlivt.bal_bce.default,
                              (z.clone().requires_grad_(write_grad), bias, la, lb, None, 0.3, 0.1, None, 0.5, write_grad,
                               None), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernel
def test_compiled_fullgraph_has_no_graph_breaks_and_matches_eager():
    z, bias, la, lb = make()
    explained = torch._dynamo.explain(loss_fn)(z.clone().requires_grad_(True), bias, la, lb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert any("fastlivt.bal_bce" in str(node.target) for g in explained.graphs for node in g.graph.nodes)
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, z.shape[1]))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    zc, ze = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss = compiled(zc, bias, la, lb, 0.5)
    (loss / 2).backward(retain_graph=True)  # the weight declared as grad_scale
    first = zc.grad.clone()
    (loss * 0.5).backward()  # again through the retained graph: the kept gradient was not modified
    assert torch.equal(zc.grad, 2 * first)
    zc.grad = first
    eager = loss_fn(ze, bias, la, lb, 0.5)
    (eager / 2).backward()
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, 0.5 * ref_grad) <= 1e-6
    assert torch.equal(loss, eager) and torch.equal(zc.grad, ze.grad)  # one op: the same numbers both ways
    with pytest.raises(RuntimeError, match="differs from grad_scale"):
        (compiled(zc, bias, la, lb, 0.5) * 3).backward()


def capture_backward_graphs(graphs: list):
    """A torch.compile backend that keeps each AOT backward graph (and runs the graphs as they are)."""
    from torch._dynamo.backends.common import aot_autograd

    from functorch.compile import make_boxed_func

    def bw(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm), bw_compiler=bw)


@needs_kernel
def test_compiled_backward_touches_no_n_by_c_tensor():
    # the backward graph checks one value and returns the forward's gradient: no op reads or writes an [N, C] tensor
    z, bias, la, lb = make(6, 13, seed=4)
    graphs: list = []
    torch._dynamo.reset()
    zc = z.clone().requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True, backend=capture_backward_graphs(graphs))(zc, bias, la, lb, 0.25)
    (loss / 4).backward()
    (graph,) = graphs
    def numel(node) -> int:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return val.numel() if isinstance(val, torch.Tensor) else 0

    ops = [n for n in graph.graph.nodes if n.op == "call_function"]
    touched = {str(n.target): max([numel(n)] + [numel(a) for a in n.all_input_nodes]) for n in ops}
    assert touched and max(touched.values()) <= 1, touched
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    grads = [a for a in out.args[0] if a is not None]
    assert len(grads) == 1 and grads[0].op == "placeholder"  # the saved gradient, handed on
    assert rel(zc.grad, bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, 13))[1] / 4) <= 1e-6


def test_op_pytorch_path_without_triton_compiles_without_breaks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel is unavailable: the op computes with PyTorch ops
    z, bias, la, lb = make(5, 11, seed=2)

    def fn(x):
        return loss_fn(x, bias, la, lb, 0.5)

    explained = torch._dynamo.explain(fn)(z.clone().requires_grad_(True))
    assert explained.graph_break_count == 0
    zc = z.clone().requires_grad_(True)
    before = dict(LAUNCHES)
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(zc)
    (loss * 0.5).backward()
    assert dict(LAUNCHES) == before  # no kernel: PyTorch ops
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, 11))
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, 0.5 * ref_grad) <= 1e-6


def test_pytorch_path_matches_reference_for_dense_and_hard_targets():
    z, bias, la, _ = make(6, 13, seed=3)
    target = torch.rand(6, 13, generator=torch.Generator().manual_seed(4))
    for kw, y in [((None, None, target), target), ((la, None, None), soft_target(la, la, 1.0, 0.2, 13))]:
        loss, grad = torch_loss_and_grad(z, bias, *kw, 1.0, 0.2)
        ref_loss, ref_grad = bal_bce_reference(z, bias, y)
        assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6


@needs_kernel
def test_inductor_fullgraph_takes_the_op_whole():
    z, bias, la, lb = make(3, 21, seed=5)
    torch._dynamo.reset()
    zc = z.clone().requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True)(zc, bias, la, lb)  # Inductor: the op stays an opaque call
    loss.backward()
    ref_loss, ref_grad = bal_bce_reference(z, bias, soft_target(la, lb, 0.3, 0.1, 21))
    assert rel(loss, ref_loss) <= 1e-6 and rel(zc.grad, ref_grad) <= 1e-6


@needs_kernel
@pytest.mark.parametrize("compile_", ["on", "off"])
def test_training_path_reads_the_logits_once_and_writes_the_gradient_once_per_micro_batch(compile_):
    # the fine-tuning task's criterion (compiled by run.compile: the CUDA default, here Inductor on the CPU) and the
    # runtime's backward, exactly as the loop calls them, at accumulation 1 and 2: counted by the launch records
    from fastlivt.config import TrainConfig
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.torch_runtime import TorchRuntime

    counts = [50, 20, 9, 5, 3, 2, 1]
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(4, 6, generator=g), torch.randint(0, 7, (4,), generator=g)
    for accum in (1, 2):
        torch._dynamo.reset()
        cfg = TrainConfig()
        cfg.run.device, cfg.run.compile, cfg.optim.accum_iter, cfg.loss.name = "cpu", compile_, accum, "bal_bce"
        runtime = TorchRuntime(cfg)
        task = BFTTask()
        task.setup(SimpleNamespace(cfg=cfg, runtime=runtime,
                                   loader=SimpleNamespace(manifest=SimpleNamespace(class_counts=counts))))
        assert task.criterion.backend == "triton"
        head = torch.nn.Linear(6, 7)
        with runtime.autocast():
            task.criterion(head(x), labels)  # warm-up: compilation
        head.zero_grad(set_to_none=True)
        for micro in range(accum):
            before, passes = dict(LAUNCHES), dict(PASSES)
            with runtime.autocast():
                loss = task.criterion(head(x), labels)
            runtime.backward(loss)
            launched = {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v - before.get(k, 0)}
            passed = {k: v - passes.get(k, 0) for k, v in PASSES.items() if v - passes.get(k, 0)}
            assert launched == {"bal_bce": 1}, (compile_, accum, launched)
            assert passed == {"logits read": 1, "gradient written": 1}, (compile_, accum, passed)
        with torch.no_grad():
            _, dlogits = bal_bce_reference(head(x), task.criterion.scaled_bias, soft_target(labels, labels, 1.0, 0.0, 7))
        # accum micro-batches of weight 1/accum: one batch's gradient
        assert rel(head.weight.grad, dlogits.T @ x.double()) <= 1e-6, (compile_, accum)


@needs_kernel
def test_bench_loss_times_the_backward_the_training_loop_runs():
    from fastlivt.bench.loss import _fwd_bwd
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss

    z, _, la, _ = make(5, 9, seed=6)
    fused = build_loss(LossConfig(name="bal_bce", fused="triton"), [40, 20, 10, 8, 5, 4, 3, 2, 1])
    ref_loss, ref_grad = bal_bce_reference(z, fused.scaled_bias, soft_target(la, la, 1.0, 0.0, 9))
    logits = z.clone().requires_grad_(True)
    step = _fwd_bwd(lambda x: fused(x, la), logits)
    for _ in range(2):  # each call: one launch, the gradient of one call (cleared, not summed)
        before = dict(LAUNCHES)
        grad = step()
        assert {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v - before.get(k, 0)} == {"bal_bce": 1}
        assert rel(grad, ref_grad) <= 1e-6


def test_launch_count_says_why_when_the_interpreter_cannot_run_the_kernel(monkeypatch):
    """Under TRITON_INTERPRET=1 with an interpreter that cannot run the kernel (triton 3.6 with numpy >= 2.4), the
    count is refused with the reason at once — no child process (which would face the same interpreter)."""
    import subprocess

    import fastlivt.kernels.launch as launch
    import fastlivt.kernels.launch_count as launch_count

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch, "interpreter_problem", lambda: "the interpreter cannot run it (probe)")

    def no_child(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess, "run", no_child)
    with pytest.raises(RuntimeError, match="cannot run it \\(probe\\)"):
        launch_count.counts_per_call(64, torch.float32, torch.device("cpu"))


def launches_and_passes(fn):
    """(launches by kernel, whole N x C passes) that ``fn()`` makes, from the launch records."""
    before, passes = dict(LAUNCHES), dict(PASSES)
    fn()
    return ({k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v - before.get(k, 0)},
            {k: v - passes.get(k, 0) for k, v in PASSES.items() if v - passes.get(k, 0)})


@needs_kernel
def test_forward_backward_is_one_launch_and_the_backward_hands_the_buffer_on():
    logits, bias, la, lb = make_case(5, 30, torch.float32, seed=4)
    _, ref_grad = bal_bce_reference(logits, bias, soft_target(la, lb, 0.8, 0.0, 30))
    head = torch.eye(30, requires_grad=True)  # logits = z @ I: the gradient reaches the head as in training
    z = logits.clone().requires_grad_(True)
    for accum in (1, 3):
        seen = []
        out = z @ head
        out.register_hook(lambda g: seen.append(g))

        def step():
            loss = bal_bce(out, bias, label_a=la, label_b=lb, lam=0.8, grad_scale=1.0 / accum)
            (loss / accum).backward()

        launches, passes = launches_and_passes(step)
        assert launches == {"bal_bce": 1} and passes == {"logits read": 1, "gradient written": 1}, accum
        assert rel(seen[0], ref_grad / accum) <= 1e-6  # the forward's buffer, already weighted by 1/accum
        z.grad = head.grad = None
    out = z @ head
    loss, grad = torch.ops.fastlivt.bal_bce(out, bias, la, lb, None, 0.8, 0.0, None, 1.0, True, None)
    seen = []
    out.register_hook(lambda g: seen.append(g))
    loss.backward()
    assert seen[0].data_ptr() == grad.data_ptr()  # no copy, no second pass: the op's own gradient output


@needs_kernel
def test_other_incoming_gradients_are_refused_never_mis_scaled():
    logits, bias, la, lb = make_case(4, 12, torch.float32, seed=8)
    z = logits.clone().requires_grad_(True)
    for weigh in (lambda loss: loss.backward(torch.tensor(-3.0)), lambda loss: (loss / 4).backward(),
                  lambda loss: torch.autograd.grad(2 * loss, z)):
        with pytest.raises(RuntimeError, match="differs from grad_scale"):
            weigh(bal_bce(z, bias, label_a=la, label_b=lb, lam=0.5))
    assert z.grad is None
    loss = bal_bce(z, bias, label_a=la, label_b=lb, lam=0.5, grad_scale=0.25)
    (loss / 4).backward(retain_graph=True)
    first = z.grad.clone()
    (loss * 0.25).backward()  # the same weight again through the retained graph: the buffer was not modified
    assert torch.equal(z.grad, 2 * first)


@needs_kernel
def test_the_loss_holds_no_reference_cycle():
    import gc
    import weakref

    logits, bias, la, lb = make_case(4, 12, torch.float32, seed=8)
    z = logits.clone().requires_grad_(True)
    loss = bal_bce(z, bias, label_a=la, label_b=lb, lam=0.5)
    ref = weakref.ref(loss)
    gc.disable()
    try:
        del loss
        assert ref() is None  # freed by reference counting: its graph (and the N x C gradient) goes with it
    finally:
        gc.enable()


@needs_kernel
def test_no_gradient_pass_without_requires_grad():
    logits, bias, la, lb = make_case(3, 20, torch.float32, seed=5)
    ref_loss, _ = bal_bce_reference(logits, bias, soft_target(la, lb, 0.5, 0.0, 20))
    out = []
    assert launches_and_passes(lambda: out.append(bal_bce(logits, bias, label_a=la, label_b=lb, lam=0.5))) == (
        {"bal_bce": 1}, {"logits read": 1})
    with torch.no_grad():  # evaluation: logits that require grad, but no graph
        assert launches_and_passes(lambda: out.append(bal_bce(logits.requires_grad_(True), bias, label_a=la,
                                                              label_b=lb, lam=0.5)))[1] == {"logits read": 1}
    for loss in out:
        assert not loss.requires_grad and rel(loss, ref_loss) <= 1e-6

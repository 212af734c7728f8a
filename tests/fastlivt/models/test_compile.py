"""``run.compile``: per-block torch.compile of the MGP and BFT models, with no graph breaks, in the plain engine and
under DeepSpeed ZeRO-2; the ``auto`` choice and the refusals. Graph breaks are a property of dynamo's tracing, not of
the code generator, so most tests compile with the cheap ``aot_eager`` backend (forward and backward are traced);
one compiles with Inductor (its C++ backend) and compares the numbers with eager."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import fastlivt.models.compile as compile_mod
from fastlivt.config import ConfigError, TrainConfig, load_config
from fastlivt.engine.optim import param_groups
from fastlivt.engine.torch_runtime import TorchRuntime
from fastlivt.models.compile import is_compiled, region_paths, resolve_compile
from fastlivt.models.mae import MaskedAutoencoderViT
from fastlivt.models.vit import build_vit

REPO = Path(__file__).resolve().parents[3]
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**TINY, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def tiny_vit(classes: int = 5):
    torch.manual_seed(0)
    return build_vit("vit_tiny", **TINY, num_classes=classes, drop_path=0.1)


def runtime(compile: str = "on", amp: str = "fp32", ckpt: bool = False) -> TorchRuntime:
    overrides = ["run.device=cpu", f"run.compile={compile}", f"run.amp={amp}", f"run.cpu_bf16={amp == 'bf16'}",
                 f"model.grad_checkpointing={ckpt}"]
    return TorchRuntime(load_config(TrainConfig, None, overrides))


@pytest.fixture
def aot_eager(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def test_auto_is_off_on_cpu_on_on_cuda_and_refuses_zero3():
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("fastlivt").addHandler(handler)
    try:
        cpu = resolve_compile("auto", "default", torch.device("cpu"))
    finally:
        logging.getLogger("fastlivt").removeHandler(handler)
    assert not cpu.enabled and "eager" in cpu.reason and "run.compile=on" in cpu.reason  # says why, and the way out
    assert any("torch.compile off" in r and cpu.reason in r for r in records), records  # the choice is logged
    cuda = resolve_compile("auto", "max-autotune-no-cudagraphs", torch.device("cuda"))
    assert cuda.enabled and cuda.mode == "max-autotune-no-cudagraphs"
    assert resolve_compile("on", "default", torch.device("cpu")).enabled
    assert resolve_compile("on", "default", torch.device("cpu")).mode is None
    assert not resolve_compile("off", "default", torch.device("cuda")).enabled
    assert not resolve_compile("auto", "default", torch.device("cuda"), zero_stage=3).enabled
    with pytest.raises(ConfigError, match="ZeRO-3"):
        resolve_compile("on", "default", torch.device("cuda"), zero_stage=3, error=ConfigError)
    with pytest.raises(ConfigError, match="run.compile: .*'maybe'"):
        runtime(compile="maybe")
    assert resolve_compile(True, "default", torch.device("cpu")).enabled  # YAML's bare `on`
    assert not resolve_compile(False, "default", torch.device("cuda")).enabled
    rt = TorchRuntime(load_config(TrainConfig, None, ["run.device=cpu", "run.compile=on",
                                                      "run.compile_mode=max-autotune-no-cudagraphs"]))
    assert rt.compile.enabled and rt.compile.mode == "max-autotune-no-cudagraphs"  # passed through to Inductor
    with pytest.raises(ConfigError, match="run.compile_mode: .*'fastest'"):
        TorchRuntime(load_config(TrainConfig, None, ["run.device=cpu", "run.compile=on", "run.compile_mode=fastest"]))


def test_compile_on_compiles_every_region_and_off_none():
    for setting, expect in (("on", True), ("off", False), ("auto", False)):  # auto: CPU here
        rt, model = runtime(compile=setting), tiny_mae()
        rt.prepare(model, param_groups(model, 0.05), 1e-3, (0.9, 0.95), 0.05)
        paths = region_paths(model)
        assert {"blocks.0", "blocks.1", "decoder_blocks.0", "patch_embed", "decoder_pred", "loss"} <= set(paths)
        assert all(is_compiled(model.get_submodule(p)) == expect for p in paths), setting
        assert rt.compile.regions == (paths if expect else [])
    vit = tiny_vit()
    assert {"blocks.0", "blocks.1", "patch_embed", "fc_norm", "head"} <= set(region_paths(vit))


def train_steps(rt: TorchRuntime, model, batch_fn, steps: int = 2):
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        with rt.autocast():
            loss = batch_fn(model)
        rt.backward(loss)
        rt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("amp,ckpt", [("fp32", False), ("bf16", True)])
def test_mgp_and_bft_compile_without_graph_breaks(aot_eager, amp, ckpt):
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    rt, mae = runtime(amp=amp, ckpt=ckpt), tiny_mae()
    mae = rt.prepare(mae, param_groups(mae, 0.05), 1e-3, (0.9, 0.95), 0.05)
    mgp = train_steps(rt, mae, lambda m: m(images)[0])
    rt, vit = runtime(amp=amp, ckpt=ckpt), tiny_vit()
    vit = rt.prepare(vit, param_groups(vit, 0.05, 0.75), 1e-3, (0.9, 0.99), 0.05)
    bft = train_steps(rt, vit, lambda m: torch.nn.functional.cross_entropy(m(images).float(), labels))
    assert all(map(torch.isfinite, torch.tensor(mgp + bft)))
    assert dict(counters["graph_break"]) == {}  # not one break, in forward or backward, with autocast and checkpointing
    assert counters["stats"]["unique_graphs"] >= 5  # the regions really went through dynamo


def test_inductor_step_matches_eager():
    """The compiled MGP step (Inductor's C++ code) gives eager's loss and gradients."""
    torch._dynamo.reset()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for setting in ("off", "on"):
        rt, model = runtime(compile=setting), tiny_mae()
        rt.prepare(model, param_groups(model, 0.05), 1e-3, (0.9, 0.95), 0.05)
        torch.manual_seed(0)
        loss, _, _ = model(images)
        loss.backward()
        out[setting] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["on"][0], out["off"][0], rtol=1e-4, atol=1e-5)
    assert out["on"][1].keys() == out["off"][1].keys()
    for name, grad in out["off"][1].items():
        torch.testing.assert_close(out["on"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    torch._dynamo.reset()


@pytest.mark.slow
def test_deepspeed_zero2_compiled_trains_without_graph_breaks():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "compile_ds_worker.py"), "aot_eager"], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["zero_stage"] == 2 and report["graph_breaks"] == 0
    assert all(report["compiled"]) and "decoder_blocks.0" in report["regions"]
    assert report["fused"]  # the torch AdamW DeepSpeed steps is the fused one
    losses = report["losses"]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_bench_imports_without_ffcv_dali_deepspeed_xformers():
    """A GPU server here has none of them: every bench part and the engine import, and the DeepSpeed part says why."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('ffcv', 'deepspeed', 'xformers') or name.startswith('nvidia.dali'):
            raise ImportError(f'{name} is not installed (blocked)')
sys.meta_path.insert(0, Block())
import importlib
for part in ('cli', 'common', 'data', 'attention', 'model', 'loss', 'step', 'compiled', 'deepspeed'):
    importlib.import_module('fastlivt.bench.' + part)
import fastlivt.engine.loop, fastlivt.engine.torch_runtime, fastlivt.engine.ds_runtime, fastlivt.data
print('imports ok')
"""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("fused", ["torch", "auto"])
def test_compiled_loss_has_no_graph_break_and_still_logs_its_path(aot_eager, caplog, fused):
    """The loss logs the path it takes on first use; inside a compiled region that log call would break the graph,
    so compile_criterion notes the path before compiling and the compiled forward only chooses it."""
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss
    from fastlivt.models.compile import CompileChoice, compile_criterion
    from fastlivt.targets import MixTarget

    loss = build_loss(LossConfig(name="bal_bce", fused=fused), [100, 40, 10, 3, 1])
    logger = logging.getLogger("fastlivt.losses")
    logger.addHandler(caplog.handler)  # the project's loggers do not propagate to the root logger
    try:
        loss = compile_criterion(loss, CompileChoice(True, None, "test"))
    finally:
        logger.removeHandler(caplog.handler)
    assert any("loss bal_bce:" in r.getMessage() and "path" in r.getMessage() for r in caplog.records)
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    for target in (y, MixTarget(y, y.flip(0), 0.6, 0.1)):
        loss(z, target).backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])

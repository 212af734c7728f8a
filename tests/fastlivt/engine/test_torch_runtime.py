"""The plain PyTorch runtime in isolation: gradient accumulation and clipping against a big batch (also under 2-process
DDP with no_sync), atomic saves, its config errors and CPU autocast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastlivt.config import TrainConfig
from fastlivt.engine.torch_runtime import TorchRuntime, checkpoint_file


def _cfg(accum=1, clip=None):
    cfg = TrainConfig()
    cfg.run.device, cfg.optim.accum_iter, cfg.optim.clip_grad = "cpu", accum, clip
    return cfg


def _train_fp64(accum: int, micro: int, steps: int, clip=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    rt = TorchRuntime(_cfg(accum, clip))
    model = rt.prepare(model, [{"params": list(model.parameters()), "weight_decay": 0.05}], 1e-2, (0.9, 0.95), 0.05)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(steps, 8, 6, generator=g, dtype=torch.float64)
    target = torch.randn(steps, 8, 3, generator=g, dtype=torch.float64)
    boundaries = []
    for s in range(steps):
        for m in range(accum):
            x, y = data[s, m * micro:(m + 1) * micro], target[s, m * micro:(m + 1) * micro]
            with rt.autocast():
                loss = ((model(x) - y) ** 2).mean()
            rt.backward(loss)
            boundaries.append(rt.step())
    return model, boundaries, rt


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_accumulation_equals_big_batch(clip):
    big, b1, _ = _train_fp64(accum=1, micro=8, steps=4, clip=clip)
    acc, b4, rt = _train_fp64(accum=4, micro=2, steps=4, clip=clip)
    assert b1 == [True] * 4 and b4 == [False, False, False, True] * 4
    assert rt.global_steps == 4 and rt.micro_steps == 16
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    if clip is not None:
        assert rt.last_grad_norm is not None and rt.last_grad_norm > clip  # clipping really happened


def test_atomic_checkpoint_survives_crash_during_save(tmp_path, monkeypatch):
    model, _, rt = _train_fp64(accum=1, micro=8, steps=1)
    rt.save(str(tmp_path), "last", {"step": 1})
    good = checkpoint_file(tmp_path, "last").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):  # half a file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        rt.save(str(tmp_path), "last", {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint_file(tmp_path, "last").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    meta = rt.load(str(tmp_path), "last")
    assert meta == {"step": 1}
    assert not any(torch.equal(p, p + 1) for p in model.parameters())


def test_save_inside_accumulation_cycle_is_refused(tmp_path):
    _, _, rt = _train_fp64(accum=4, micro=2, steps=1)
    rt.micro_steps += 1
    with pytest.raises(RuntimeError, match="accumulation cycle"):
        rt.save(str(tmp_path), "last", {})


def test_full_state_dict_is_fp32_cpu_copy():
    model, _, rt = _train_fp64(accum=1, micro=8, steps=1)
    sd = rt.full_state_dict()
    assert set(sd) == set(model.state_dict())
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        torch.testing.assert_close(v.double(), model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_bad_runtime_config_is_a_clear_error():
    """run.amp and run.device are checked once, when the config is loaded, before any runtime is built."""
    from fastlivt.config import ConfigError, from_dict

    for key, value in (("amp", "fp16"), ("device", "tpu")):
        with pytest.raises(ConfigError, match=f"run.{key}: expected one of .*got '{value}'"):
            from_dict(TrainConfig, {"run": {key: value}})


def test_bf16_autocast_on_cpu_only_when_asked_for():
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for cpu_bf16, amp, want in [(False, "bf16", torch.float32), (True, "bf16", torch.bfloat16), (True, "fp32", torch.float32)]:
        cfg = _cfg()
        cfg.run.device, cfg.run.amp, cfg.run.cpu_bf16 = "cpu", amp, cpu_bf16
        rt = TorchRuntime(cfg)
        rt.prepare(layer, [{"params": list(layer.parameters())}], 1e-3, (0.9, 0.99), 0.0)
        with rt.autocast():
            assert layer(x).dtype == want, (cpu_bf16, amp)
    from fastlivt.engine.ds_runtime import build_deepspeed_config

    cfg = _cfg()
    cfg.run.cpu_bf16, cfg.deepspeed = True, {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="run.cpu_bf16"):
        build_deepspeed_config(cfg, 1, use_cuda=False)


@pytest.mark.slow
def test_ddp_accumulation_with_no_sync_equals_big_batch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = Path(__file__).resolve().parents[2] / "helpers" / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["syncs"] == [False, True] * 3  # all-reduce only on the backward that ends a cycle
    torch.manual_seed(0)  # rank 0's initial weights, broadcast by DDP
    ref, _, _ = _train_fp64(accum=1, micro=8, steps=3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got["state"][k].double(), v, rtol=1e-6, atol=1e-7)

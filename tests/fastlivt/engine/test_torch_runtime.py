"""Engine parts in isolation: schedule, parameter groups, runtime semantics (accumulation, clipping, atomic saves)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastlivt.config import TrainConfig
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.engine.torch_runtime import TorchRuntime, checkpoint_file


# --------------------------------------------------------------------------------------------------- schedule
def test_schedule_values_at_known_steps():
    # peak 1.0, floor 0.1, 2 warmup epochs of 10, 5 optimizer steps per epoch (50 steps)
    s = WarmupCosine(peak_lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10, steps_per_epoch=5)
    assert s.total_steps == 50
    expected = {
        0: 0.0,
        1: 0.1,                 # 0.2 epochs / 2 warmup epochs
        5: 0.5,                 # end of the first epoch: half of the warmup
        10: 1.0,                # end of warmup: peak (cos 0)
        30: 0.55,               # half-way through the cosine: 0.1 + 0.9 * 0.5
        20: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),   # a quarter of the cosine
        49: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)),
        50: 0.1,
    }
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, abs=1e-12), step


def test_schedule_matches_timm_cosine_per_iteration():
    from timm.scheduler import CosineLRScheduler

    steps_per_epoch, warmup, epochs, peak, floor = 7, 3, 12, 2e-3, 1e-6
    s = WarmupCosine(peak, floor, warmup, epochs, steps_per_epoch)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    timm_s = CosineLRScheduler(opt, t_initial=(epochs - warmup) * steps_per_epoch, lr_min=floor,
                               warmup_t=warmup * steps_per_epoch, warmup_lr_init=0.0, warmup_prefix=True,
                               t_in_epochs=False)
    for step in range(epochs * steps_per_epoch):
        timm_s.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(s(step), rel=1e-12, abs=1e-15), step


def test_schedule_refuses_changed_resume():
    a = WarmupCosine(1.0, 0.0, 1, 4, 10)
    a.check_resumable(a.state_dict())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupCosine(1.0, 0.0, 1, 4, 11).check_resumable(a.state_dict())


# --------------------------------------------------------------------------------------------------- optimizer
def tiny_vit(depth=3):
    from fastlivt.models.vit import build_vit

    return build_vit("vit_tiny", img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=depth, num_heads=2)


def test_peak_lr_is_blr_times_effective_batch_over_256():
    assert peak_lr(1.5e-4, None, 64, 16, 4) == pytest.approx(1.5e-4 * 4096 / 256)
    assert peak_lr(1e-3, 5e-3, 64, 16, 4) == 5e-3


def test_no_weight_decay_on_bias_norm_pos_tokens():
    model = tiny_vit()
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(wd) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, d in wd.items():
        exempt = n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token")
        assert d == (0.0 if exempt else 0.05), n
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_layer_decay_scales_like_mae_param_groups_lrd():
    depth, ld = 3, 0.75
    model = tiny_vit(depth)
    groups = param_groups(model, 0.05, layer_decay=ld)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            # MAE util/lr_decay.py: embeddings are layer 0, blocks.i layer i+1, the rest (fc_norm, head) layer L+1
            if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
                layer = 0
            elif n.startswith("blocks."):
                layer = int(n.split(".")[1]) + 1
            else:
                layer = depth + 1
            assert g["lr_scale"] == pytest.approx(ld ** (depth + 1 - layer)), n
            exempt = p.ndim == 1 or n in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if exempt else 0.05), n
            seen += 1
    assert seen == sum(1 for _ in model.parameters())
    # set_lr applies the scale on the optimizer that steps
    rt = TorchRuntime(_cfg())
    rt.prepare(model, groups, 1.0, (0.9, 0.99), 0.05)
    rt.set_lr(0.01)
    assert sorted(rt.lrs()) == pytest.approx(sorted(0.01 * g["lr_scale"] for g in groups))


# --------------------------------------------------------------------------------------------------- runtime
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


# --------------------------------------------------------------------------------------------------- configs
TABLE10 = {  # paper Table 10: (epochs, warmup, effective batch, betas, blr, min_lr, input size, drop path, tau)
    "imagenet_lt/mgp": (800, 40, 4096, (0.9, 0.95), 1.5e-4, 0.0, 224, None, None),
    "inat18/mgp": (800, 40, 4096, (0.9, 0.95), 1.5e-4, 0.0, 128, None, None),
    "places_lt/mgp": (800, 40, 4096, (0.9, 0.95), 1.5e-4, 0.0, 224, None, None),
    "imagenet_lt/bft": (100, 10, 1024, (0.9, 0.99), 1e-3, 1e-6, 224, 0.1, 1.0),
    "inat18/bft": (100, 10, 1024, (0.9, 0.99), 1e-3, 1e-6, 224, 0.2, 1.0),
    "places_lt/bft": (30, 5, 1024, (0.9, 0.99), 1e-3, 1e-6, 224, 0.1, 1.05),
}


@pytest.mark.parametrize("name", sorted(TABLE10))
def test_configs_hold_table10(name):
    from pathlib import Path

    from fastlivt.config import load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[3] / "configs" / f"{name}.yaml")
    epochs, warmup, eff, betas, blr, min_lr, size, dp, tau = TABLE10[name]
    assert (cfg.run.epochs, cfg.optim.warmup_epochs, cfg.optim.betas) == (epochs, warmup, betas)
    assert cfg.data.batch_size * cfg.optim.accum_iter * 8 == eff  # as written for 8 GPUs
    assert (cfg.optim.blr, cfg.optim.min_lr, cfg.optim.weight_decay) == (blr, min_lr, 0.05)
    assert cfg.data.img_size == cfg.model.img_size == size
    if name.endswith("mgp"):
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss and cfg.data.rrc_scale == (0.2, 1.0)
        assert cfg.optim.layer_decay is None
    else:
        assert (cfg.model.drop_path, cfg.loss.tau, cfg.optim.layer_decay, cfg.loss.name) == (dp, tau, 0.75, "bal_bce")
        assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob) == (0.8, 1.0, 0.25)
        assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1"


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


@pytest.mark.parametrize("old_world,old_accum,world,accum,kept", [
    (2, 2, 1, 4, True), (1, 4, 2, 2, True), (8, 1, 4, 2, True), (2, 2, 2, 2, True), (2, 1, 3, 1, False)])
def test_elastic_resume_keeps_the_effective_batch_when_the_world_allows(old_world, old_accum, world, accum, kept):
    from fastlivt.engine.elastic import plan_resume, rescaled_step

    cfg = TrainConfig()
    cfg.data.batch_size, cfg.optim.accum_iter = 8, old_accum
    meta = {"sampler": {"world": old_world, "accum": old_accum, "batch_size": 8}}
    plan = plan_resume(meta, cfg, world)  # logs plan.describe() when the world size changed
    assert plan.accum == accum and plan.kept == kept
    assert cfg.optim.accum_iter == old_accum  # planning only reads the config
    if world != old_world:
        assert ("keeps the effective batch" if kept else "the effective batch changes 16 -> 24") in plan.describe()
    # the schedule continues at the same fractional epoch: 96 samples of epoch 3 done, 32 samples per step
    assert rescaled_step(3, 96, 10, 32) == 33
    cfg.data.batch_size = 16
    with pytest.raises(ValueError, match="data.batch_size=8.*16"):
        plan_resume(meta, cfg, world)

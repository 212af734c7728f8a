"""The training loop end to end on CPU with tiny models: exact resume (MGP and BFT), learning on Fashion-MNIST-LT,
BFT starting from the MGP export at another resolution, logs and exports."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine_doubles import FMNIST, MemoryLoader, SimulatedCrash, fmnist_longtail, tiny_vit, write_manifest
from fastlivt.config import TrainConfig
from fastlivt.engine.finetune import BFTTask
from fastlivt.engine.loop import train
from fastlivt.engine.pretrain import MGPTask

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST}")
LT = [300, 180, 110, 70, 40, 25, 15, 10, 6, 4]  # long-tailed class sizes (imbalance 75)


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """Long-tailed Fashion-MNIST train images (32 px, normalized, 3 channels), a balanced test set, and manifests."""
    root = tmp_path_factory.mktemp("fmnist")
    x, y = fmnist_longtail("train", LT)
    xt, yt = fmnist_longtail("test", [20] * 10)
    return dict(x=x, y=y, xt=xt, yt=yt, train=write_manifest(root / "train", y.numpy(), 10),
                val=write_manifest(root / "val", yt.numpy(), 10, split="val"))


def small(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 2)  # 32 -> 16 px


def tiny_cfg(out, stage: str, img: int = 16, epochs: int = 2, accum: int = 2, batch: int = 8) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.stage, cfg.run.out, cfg.run.epochs, cfg.run.device = stage, str(out), epochs, "cpu"
    cfg.run.log_every, cfg.run.progress, cfg.run.vis_every = 1, False, 1
    tiny_vit(cfg, img, decoder_embed_dim=32)
    cfg.data.batch_size, cfg.optim.accum_iter = batch, accum
    m = cfg.model
    if stage == "finetune":
        cfg.optim.betas, cfg.optim.layer_decay, cfg.optim.min_lr = (0.9, 0.99), 0.75, 1e-6
        m.drop_path, cfg.run.ema, cfg.loss.name, cfg.loss.fused = 0.1, 0.99, "bal_bce", "torch"
        cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.smoothing = 0.8, 1.0, 0.25, 0.1
        cfg.data.val = "memory"
    return cfg


def loaders(data, cfg, n_train: int, crash_after=None):
    """A loader factory handing out in-memory loaders (train: the first n_train long-tailed images)."""
    from fastlivt.data.augment import BatchAugment

    size = cfg.data.img_size
    fit = (lambda t: t) if size == 32 else small
    xs, ys = fit(data["x"]), data["y"]
    keep = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))[:n_train]

    def make(cfg_, split, stage, runtime):
        if split == "val":
            return MemoryLoader(fit(data["xt"]), data["yt"], 16, data["val"], shuffle=False, drop_last=False)
        aug = None
        if stage == "finetune":
            aug = BatchAugment(10, cfg_.data.mixup, cfg_.data.cutmix, cfg_.data.smoothing, cfg_.data.reprob,
                               seed=cfg_.run.seed)
        return MemoryLoader(xs[keep], ys[keep], cfg_.data.batch_size, data["train"], seed=cfg_.run.seed,
                            crash_after=crash_after, batch_augment=aug)
    return make


def assert_same_training_state(a, b):
    sa, sb = a.runtime.unwrap().state_dict(), b.runtime.unwrap().state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.runtime.optimizer.state_dict(), b.runtime.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]


def steps_logged(path):
    with open(path) as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("stage,crash_after", [("pretrain", 10), ("pretrain", 7), ("finetune", 10), ("finetune", 7)])
def test_kill_and_resume_equals_uninterrupted(fmnist, tmp_path, stage, crash_after, mgp_export):
    # 48 images, batch 8, accumulation 2: 3 optimizer steps per epoch, 6 in all; checkpoint every 2 steps
    task_cls = MGPTask if stage == "pretrain" else BFTTask
    cfg_a = tiny_cfg(tmp_path / "a", stage)
    cfg_a.run.ckpt_every_steps = 2
    if stage == "finetune":
        cfg_a.model.init = str(mgp_export)
    task_a = task_cls()
    a = train(cfg_a, task_a, make_loader=loaders(fmnist, cfg_a, 48))
    assert a.step == 6

    cfg_b = tiny_cfg(tmp_path / "b", stage)
    cfg_b.run.ckpt_every_steps, cfg_b.model.init = 2, cfg_a.model.init
    # killed at micro-batch 11 (epoch 1, inside the cycle of step 6, after the checkpoint of step 4, mid-epoch)
    # or 8 (epoch 1, inside the cycle of step 4, after the epoch-end checkpoint of step 3)
    with pytest.raises(SimulatedCrash):
        train(cfg_b, task_cls(), make_loader=loaders(fmnist, cfg_b, 48, crash_after=crash_after))
    assert max(steps_logged(tmp_path / "b" / "train.csv")) == crash_after // 2
    task_b = task_cls()
    b = train(cfg_b, task_b, resume=True, make_loader=loaders(fmnist, cfg_b, 48))
    assert b.step == 6
    assert_same_training_state(a, b)
    assert steps_logged(tmp_path / "b" / "train.csv") == list(range(1, 7))  # each step once
    if stage == "pretrain":
        assert (tmp_path / "a/recon/epoch0002.png").read_bytes() == (tmp_path / "b/recon/epoch0002.png").read_bytes()
        ea, eb = load_file(tmp_path / "a/encoder.safetensors"), load_file(tmp_path / "b/encoder.safetensors")
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
        assert not any(k.startswith("decoder") or k == "mask_token" for k in ea)
    else:
        assert a.summary["last_eval"] == b.summary["last_eval"]
        ea, eb = task_a.ema.module.state_dict(), task_b.ema.module.state_dict()
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
        for name in ("model.safetensors", "model_ema.safetensors"):
            assert (tmp_path / "b" / name).is_file(), name


@pytest.fixture(scope="session")
def mgp_export(fmnist, tmp_path_factory):
    """An MGP run at 16 px (4x4 patch grid) and its encoder export."""
    out = tmp_path_factory.mktemp("mgp")
    cfg = tiny_cfg(out, "pretrain", epochs=1)
    run = train(cfg, MGPTask(), make_loader=loaders(fmnist, cfg, 32))
    return out / "encoder.safetensors"


def test_mgp_on_fashion_mnist_lowers_reconstruction_loss(fmnist, tmp_path):
    # 760 long-tailed images at 32 px, patch 4 (64 patches, 16 visible), batch 32: 23 steps per epoch, 276 in all
    cfg = tiny_cfg(tmp_path, "pretrain", img=32, epochs=12, accum=1, batch=32)
    cfg.model.embed_dim, cfg.model.num_heads = 64, 4
    cfg.optim.lr, cfg.optim.warmup_epochs, cfg.run.log_every, cfg.run.vis_every = 1.5e-3, 1, 10, 6
    run = train(cfg, MGPTask(), make_loader=loaders(fmnist, cfg, sum(LT)))
    assert run.step == 276
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    loss = np.array([float(r["loss"]) for r in rows])
    lr = np.array([float(r["lr"]) for r in rows])
    assert len(loss) == 28 and np.isfinite(loss).all()  # every 10 steps, and the last
    first, last = loss[0], loss[-3:].mean()
    assert last < 0.75 * first, (first, last)  # norm_pix MSE starts near 1
    assert lr.max() == pytest.approx(1.5e-3, rel=0.02) and lr[-1] < 1e-4  # warmup then cosine
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["epoch0006.png", "epoch0012.png"]
    assert any((tmp_path / "tb").iterdir())


def test_bft_starts_from_mgp_export_at_another_resolution(fmnist, tmp_path, mgp_export):
    # the export was trained at 16 px (4x4 grid); fine-tune at 32 px (8x8 grid)
    cfg = tiny_cfg(tmp_path, "finetune", img=32, epochs=1)
    cfg.model.init = str(mgp_export)
    model = BFTTask().build_model(cfg, fmnist["train"])
    enc = load_file(mgp_export)
    assert enc["pos_embed"].shape[1] == 1 + 16 and model.pos_embed.shape[1] == 1 + 64
    for k, v in enc.items():
        if k not in ("pos_embed",) and not k.startswith("norm."):
            assert torch.equal(model.state_dict()[k], v), k
    # the class-token position is kept, the grid is resampled (a 4x4 -> 8x8 bicubic resize keeps the mean closely)
    assert torch.equal(model.pos_embed[0, 0], enc["pos_embed"][0, 0])
    torch.testing.assert_close(model.pos_embed[0, 1:].mean(0), enc["pos_embed"][0, 1:].mean(0), atol=0.05, rtol=0)
    run = train(cfg, BFTTask(), make_loader=loaders(fmnist, cfg, 48))
    assert run.step == 3 and (tmp_path / "model.safetensors").is_file()
    for k in ("top1", "top5", "many", "medium", "few", "ema_top1", "best_top1"):
        assert k in run.summary["last_eval"], k


def test_evaluate_cli_writes_metrics_files(fmnist, tmp_path, mgp_export, monkeypatch):
    import json

    from fastlivt.engine import evaluate

    cfg = tiny_cfg(tmp_path / "run", "finetune", epochs=1)
    cfg.model.init, cfg.data.train = str(mgp_export), fmnist["train"].root
    make = loaders(fmnist, cfg, 48)
    train(cfg, BFTTask(), make_loader=make)
    monkeypatch.setattr(evaluate, "default_loader", lambda c, split, stage, device: make(c, split, stage, None))
    out = tmp_path / "eval"
    for ckpt_file in ("run/model.safetensors", "run/checkpoints/last.pt"):
        rc = evaluate.main(["--checkpoint", str(tmp_path / ckpt_file), "--data", fmnist["val"].root,
                            "--out", str(out), "data.batch_size=10"])
        assert rc == 0
        names = sorted(p.name for p in out.iterdir())
        assert names == ["acc_vs_class_size.png", "metrics.json", "per_class.csv", "reliability.png"], names
        metrics = json.loads((out / "metrics.json").read_text())
        # recompute top-1 from the exported weights independently of the engine's prediction code
        from fastlivt.models.vit import build_vit_from_config

        model = build_vit_from_config(cfg.model, 10).eval()
        model.load_state_dict(load_file(tmp_path / "run/model.safetensors"))
        with torch.no_grad():
            pred = model(small(fmnist["xt"])).argmax(1)
        assert metrics["overall"] == pytest.approx(100 * (pred == fmnist["yt"]).float().mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="not a fine-tuned classifier"):
        evaluate.main(["--checkpoint", str(mgp_export), "--data", fmnist["val"].root])

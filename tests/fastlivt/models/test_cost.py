"""Model FLOPs per image (the MFU numerator) against torch's FlopCounterMode, the MFU arithmetic, the GEMM peak, and
the training log's img/s, MFU and loader-wait columns."""
from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastlivt.engine.logger as logger_mod
from fastlivt.bench.common import mfu_extra
from fastlivt.config import TrainConfig, load_config
from fastlivt.engine.logger import TrainLogger
from fastlivt.models.cost import bft_cost, cost_from_config, gemm_peak_flops, mgp_cost
from fastlivt.models.mae import MaskedAutoencoderViT
from fastlivt.models.vit import build_vit

SPEC = dict(embed_dim=64, depth=2, num_heads=4)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_mgp_flops_match_the_flop_counter(mask_ratio):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=32, patch_size=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                                 attention="math", **SPEC)
    imgs = torch.randn(3, 3, 32, 32)
    cost = mgp_cost("vit_tiny", img_size=32, patch_size=4, mask_ratio=mask_ratio, decoder_dim=32, decoder_depth=2,
                    **SPEC)
    fwd = counted(lambda: model(imgs, mask_ratio=mask_ratio))
    assert fwd == pytest.approx(3 * cost.forward_flops, rel=2e-3)  # visible-only encoder + decoder, matmuls only

    def train():
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()

    # backward = 2x forward, less the input gradient of the patch projection (images need none)
    assert counted(train) == pytest.approx(3 * cost.train_flops, rel=0.03)
    all_tokens = counted(lambda: model(imgs, mask_ratio=mask_ratio, visible_only=False))
    assert all_tokens > fwd * 1.2  # the counter sees the visible-only saving the formula claims


def test_bft_flops_match_the_flop_counter():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=7, attention="math", **SPEC)
    imgs = torch.randn(2, 3, 32, 32)
    cost = bft_cost("vit_tiny", img_size=32, patch_size=4, num_classes=7, **SPEC)
    assert counted(lambda: model(imgs)) == pytest.approx(2 * cost.forward_flops, rel=2e-3)
    assert counted(lambda: model(imgs).sum().backward()) == pytest.approx(2 * cost.train_flops, rel=0.03)
    cfg = load_config(TrainConfig, None, ["model.arch=vit_tiny", "model.img_size=32", "model.patch_size=4",
                                          "model.embed_dim=64", "model.depth=2", "model.num_heads=4"])
    assert cost_from_config(cfg, "bft", 7).forward_flops == cost.forward_flops


def test_vit_b_mgp_flops_are_the_issue_arithmetic():
    """ViT-B/16 MGP: ~8.6 GFLOP encoder (50 tokens) + ~10.6 GFLOP decoder (197 tokens) forward, x3 = ~59 GFLOP."""
    cost = mgp_cost("vit_base")
    assert 55e9 < cost.train_flops < 62e9
    assert 50 < cost.activation_bytes / 1e6 < 70  # MB per image (estimate: 38 bytes per token, width and block)
    assert bft_cost("vit_base").params == pytest.approx(86.6e6, rel=0.01)  # timm's ViT-B/16 with a 1000-class head


def test_mfu_arithmetic_and_measured_peak():
    extra = mfu_extra(img_per_s=1000.0, flops_per_image=5e9, peak_flops=1e13)
    assert extra["mfu"] == pytest.approx(0.5) and extra["achieved_tflops"] == pytest.approx(5.0)
    state = torch.random.get_rng_state()
    peak = gemm_peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e8 and torch.equal(state, torch.random.get_rng_state())  # measured without touching the RNG


def test_train_csv_has_img_s_mfu_and_loader_wait(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: clock["t"])

    def slow_loader():
        for i in range(4):
            clock["t"] += 0.3  # the loader takes 0.3 s per batch
            yield i

    log = TrainLogger(tmp_path, enabled=True, total_steps=4, start_step=0, desc="T", progress=False, tensorboard=False,
                      flops_per_image=2e9, peak_flops=1e12, world=1)
    for step, _ in enumerate(log.timed(slow_loader()), start=1):
        clock["t"] += 0.7  # compute: 0.7 s per step
        log.count(100)
        log.step(step, {"loss": 1.0}, write=step % 2 == 0)
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert [r["step"] for r in rows] == ["2", "4"]
    for r in rows:
        assert float(r["img_s"]) == pytest.approx(100.0)  # 200 images in 2 s
        assert float(r["mfu"]) == pytest.approx(100.0 * 2e9 / 1e12)
        assert float(r["data_wait"]) == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["imagenet_lt/mgp", "inat18/mgp", "places_lt/mgp", "imagenet_lt/bft", "inat18/bft",
                                  "places_lt/bft", "imagenet_lt/bft_vitl_384", "inat18/bft_vitl_384"])
def test_config_micro_batches_fit_an_80gb_gpu_by_the_estimate(name):
    from pathlib import Path

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[3] / "configs" / f"{name}.yaml")
    stage = "mgp" if name.endswith("mgp") else "bft"
    cost = cost_from_config(cfg, stage, num_classes=8142)  # iNat18's classes: the largest head
    estimate = cost.memory_gb(cfg.data.batch_size)
    assert estimate < 0.75 * 80, estimate  # a quarter of the card left for the allocator, workspaces, the loader
    if stage == "mgp":  # sized up from 64: the micro-batch uses the card, accumulation only where it must
        assert cfg.data.batch_size >= 512 and estimate > 0.1 * 80

"""The run-safety tests' tiny MGP run, a task whose loss turns NaN on chosen steps, and an in-memory loader (used by
tests/fastlivt/engine/test_run_safety.py, tests/project/test_run_safety_cli.py and ds_nonfinite_worker.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from engine_doubles import MemoryLoader, write_manifest
from fastlivt.config import TrainConfig
from fastlivt.engine.pretrain import MGPTask

COUNTS = [12, 8, 4]


def tiny_mgp(out: Path, **run) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.stage, cfg.run.out, cfg.run.epochs, cfg.run.device = "pretrain", str(out), 2, "cpu"
    cfg.run.progress, cfg.run.tensorboard, cfg.run.vis_every, cfg.run.log_every = False, False, 0, 3
    cfg.run.ckpt_every_steps = 2
    for k, v in run.items():
        setattr(cfg.run, k, v)
    cfg.data.img_size = cfg.model.img_size = 8
    cfg.data.batch_size = 4
    m = cfg.model
    m.arch, m.patch_size, m.embed_dim, m.depth, m.num_heads = "vit_tiny", 4, 16, 1, 2
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.attention = 16, 1, 2, "sdpa"
    cfg.optim.lr, cfg.optim.warmup_epochs = 1e-3, 0.5
    return cfg


class PoisonedMGP(MGPTask):
    """MGP whose loss is NaN on the optimizer steps in ``bad`` (1-based), like a diverging run."""

    def __init__(self, bad):
        super().__init__()
        self.bad = set(bad)

    def forward(self, run, images, labels):
        loss, scalars = super().forward(run, images, labels)
        return (loss * float("nan") if run.step + 1 in self.bad else loss), scalars


def loader_factory(tmp: Path):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([c for c, n in enumerate(COUNTS) for _ in range(n)])
    images = torch.randn(len(labels), 3, 8, 8, generator=g)
    manifest = write_manifest(tmp / "memory", labels.numpy(), len(COUNTS))
    return lambda c, split, stage, rt: MemoryLoader(images, labels, c.data.batch_size, manifest, seed=c.run.seed)


def all_finite(state) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())

"""The run that wrote ``tests/data/checkpoint_format1/``: a BFT checkpoint ``last`` of the first on-disk format (one
``last.pt`` holding model, optimizer, the runtime's counters with per-rank RNG states, and the meta dict with
``sampler`` / ``schedule`` / ``extra``), written by the engine as it was before the training state became parts.

Tiny ViT at 16 px on 48 long-tailed Fashion-MNIST images, batch 8, accumulation 2 (3 optimizer steps per epoch),
EMA on, checkpoint every 2 steps, stopped by ``run.max_steps=4``: ``last`` is mid-epoch (epoch 1, 16 of 48 samples,
step 4). A resume with ``run.max_steps=0`` continues to step 6.

The fixture's run drew its batch augmentation from the global generators (:class:`FixtureBatchAugment`, timm's code as
BatchAugment ran it then); the augmentation now draws from (seed, epoch, positions). The uninterrupted reference run
therefore augments the batches ``last.pt`` was trained on as the fixture's run did, and the rest as a resumed run does
(:class:`FixtureThenCurrent`).

``python3 tests/helpers/legacy_checkpoint.py`` rewrites the fixture (only meaningful with the engine that wrote it).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_doubles import MemoryLoader, fmnist_longtail, write_manifest  # noqa: E402
from fastlivt.config import TrainConfig  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "checkpoint_format1"
LT = [300, 180, 110, 70, 40, 25, 15, 10, 6, 4]
N_TRAIN = 48


def fixture_cfg(out, max_steps: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.stage, cfg.run.out, cfg.run.epochs, cfg.run.device = "finetune", str(out), 2, "cpu"
    cfg.run.log_every, cfg.run.progress, cfg.run.ckpt_every_steps, cfg.run.max_steps = 1, False, 2, max_steps
    cfg.data.img_size = cfg.model.img_size = 16
    cfg.data.batch_size, cfg.optim.accum_iter = 8, 2
    cfg.data.mean, cfg.data.std = (0.2860,) * 3, (0.3530,) * 3
    m = cfg.model
    m.arch, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.attention = "vit_tiny", 4, 16, 1, 2, "sdpa"
    cfg.optim.warmup_epochs, cfg.optim.lr = 0.5, 1e-3
    cfg.optim.betas, cfg.optim.layer_decay, cfg.optim.min_lr = (0.9, 0.99), 0.75, 1e-6
    m.drop_path, cfg.run.ema, cfg.loss.name, cfg.loss.fused = 0.1, 0.99, "bal_bce", "torch"
    cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.smoothing = 0.8, 1.0, 0.25, 0.1
    cfg.data.val = "memory"
    return cfg


class FixtureBatchAugment:
    """The batch augmentation the fixture's run applied, when BatchAugment still drew from the global generators:
    timm ``RandomErasing`` (mode 'pixel', one box; Python's ``random`` and torch's generator), then timm ``Mixup``
    in batch mode (numpy's generator), on each batch right before its forward pass."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, smoothing: float, reprob: float):
        from timm.data.mixup import Mixup
        from timm.data.random_erasing import RandomErasing

        self.smoothing = smoothing
        self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                           correct_lam=True, label_smoothing=smoothing, num_classes=num_classes)
        self.eraser = RandomErasing(reprob, mode="pixel", max_count=1, num_splits=0, device="cpu")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        from fastlivt.targets import MixTarget

        images = self.eraser(images)
        lam = float(self.mixer._mix_batch(images))
        return images, MixTarget(labels, labels.flip(0), lam, self.smoothing)


class FixtureThenCurrent:
    """A batch augmentation for a run that redoes the fixture's training and goes on: the fixture's
    (:class:`FixtureBatchAugment`) for the batches before ``until = (epoch, first position)`` — what ``last.pt`` was
    trained on — and the current one, drawn from (seed, epoch, positions), from there."""

    def __init__(self, fixture: FixtureBatchAugment, current, until: tuple):
        self.fixture, self.current, self.until = fixture, current, until

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, positions):
        if (epoch, int(positions[0])) < self.until:
            return self.fixture(images, labels)
        return self.current(images, labels, epoch, positions)


def fixture_loaders(manifest_dir: Path, val_dir: Path, fixture_until: Optional[tuple] = None):
    """The loader factory of the fixture's run: train on ``manifest_dir``'s manifest, validate on ``val_dir``'s.
    ``fixture_until = (epoch, position)``: the batches before it augmented as the fixture's run did
    (:class:`FixtureThenCurrent`); otherwise all by the current BatchAugment."""
    from fastlivt.data_prep.manifest import load_manifest
    from fastlivt.data.augment import BatchAugment

    x, y = fmnist_longtail("train", LT)
    xt, yt = fmnist_longtail("test", [4] * 10)
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:N_TRAIN]
    xs, ys = torch.nn.functional.avg_pool2d(x[keep], 2), y[keep]
    train_manifest = load_manifest(manifest_dir / "manifest.json")
    val_manifest = write_manifest(val_dir, yt.numpy(), 10, split="val")

    def make(cfg, split, stage, runtime):
        if split == "val":
            return MemoryLoader(torch.nn.functional.avg_pool2d(xt, 2), yt, 8, val_manifest, shuffle=False,
                                drop_last=False)
        aug = BatchAugment(10, cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing, cfg.data.reprob, seed=cfg.run.seed)
        if fixture_until is not None:
            fixture = FixtureBatchAugment(10, cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing, cfg.data.reprob)
            aug = FixtureThenCurrent(fixture, aug, fixture_until)
        return MemoryLoader(xs, ys, cfg.data.batch_size, train_manifest, seed=cfg.run.seed, batch_augment=aug)
    return make


def write_fixture() -> None:
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, y = fmnist_longtail("train", LT)
        FIXTURE.mkdir(parents=True, exist_ok=True)
        write_manifest(FIXTURE, y.numpy(), 10)  # the class counts of the whole long-tailed set
        make = fixture_loaders(FIXTURE, tmp / "val")
        train(fixture_cfg(tmp / "run", max_steps=4), BFTTask(), make_loader=make)
        shutil.copyfile(tmp / "run" / "checkpoints" / "last.pt", FIXTURE / "last.pt")
    print(f"wrote {FIXTURE}: {sorted(p.name for p in FIXTURE.iterdir())}")


if __name__ == "__main__":
    write_fixture()

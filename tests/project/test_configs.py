"""The shipped configs under configs/ hold the paper's Table 10 hyper-parameters."""
from pathlib import Path

import pytest

from fastlivt.config import TrainConfig, load_config

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
    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
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

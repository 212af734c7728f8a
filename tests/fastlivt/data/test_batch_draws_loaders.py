"""The loaders apply BFT's batch augmentation with the draws of each batch's global positions: the same batches on
any world size's ranks, after a seek (resume), with any number of workers, and the same draws on every backend.
(The draws themselves against timm: test_batch_draws.py.)"""
import numpy as np
import pytest
import torch

from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader

AUG = ["data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.5", "data.smoothing=0.1"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """24 JPEGs of varied sizes in 2 classes, converted (needs FFCV and DALI)."""
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from convert_testdata import convert_imagefolder, smooth_image

    root = tmp_path_factory.mktemp("batch-draws")
    rng = np.random.default_rng(4)
    for c, n in enumerate([14, 10]):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for k in range(n):
            h, w = (int(v) for v in rng.integers(30, 60, 2))
            Image.fromarray(smooth_image(rng, h, w)).save(root / "src" / f"c{c}" / f"{k}.jpg", quality=95)
    return convert_imagefolder(root / "src", root / "out")


def _batches(out, backend, *over, world=1, rank=0, seek=None):
    cfg = load_config(TrainConfig, None, [f"data.train={out}", f"data.backend={backend}", "data.img_size=16",
                                          "data.batch_size=4", "data.workers=0", "run.seed=5", *over])
    with build_loader(cfg, "train", "finetune", device="cpu", rank=rank, world=world) as loader:
        if seek is not None:
            loader.seek(*seek)
        return [(x.clone(), y) for x, y in loader], loader.batch_augment


@pytest.fixture
def no_numba_jit():
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_loader_applies_the_draws_of_each_batchs_global_positions(split, backend, no_numba_jit):
    for world, rank in ((1, 0), (2, 1)):
        plain, none = _batches(split, backend, world=world, rank=rank)
        augmented, aug = _batches(split, backend, *AUG, world=world, rank=rank)
        assert none is None and aug is not None and len(plain) == len(augmented) > 1
        for k, ((x, y), (xa, target)) in enumerate(zip(plain, augmented)):
            positions = rank + world * np.arange(4 * k, 4 * k + 4)  # the batch's samples in the epoch's order
            expected, expected_target = aug(x.clone(), y, 0, positions)
            assert torch.equal(xa, expected) and target.lam == expected_target.lam and target.smoothing == 0.1
            assert torch.equal(target.label_a, y) and torch.equal(target.label_b, y.flip(0))
    # a resumed pass (seek past the first 2 batches) augments its batches as the whole pass did
    whole, _ = _batches(split, backend, *AUG)
    resumed, _ = _batches(split, backend, *AUG, seek=(8, 4 * len(whole)))
    assert len(resumed) == len(whole) - 2
    for (x, t), (xr, tr) in zip(whole[2:], resumed):
        assert torch.equal(x, xr) and t.lam == tr.lam


def test_batch_augmentation_is_the_same_for_any_workers_and_backend(split, no_numba_jit):
    serial, _ = _batches(split, "torch", *AUG)
    workers, _ = _batches(split, "torch", *AUG, "data.workers=2")
    assert all(torch.equal(a, b) and s.lam == t.lam for (a, s), (b, t) in zip(serial, workers))
    ffcv, _ = _batches(split, "ffcv", *AUG)  # other decoders, the same draws
    lams = [t.lam for _, t in serial]
    assert [t.lam for _, t in ffcv] == lams and len(set(lams)) > 1

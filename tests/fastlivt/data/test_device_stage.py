"""Every backend (ffcv, dali, torch) applies the one device RandAugment, with each sample's draws from
(run.seed, epoch, position): a BFT batch = the shared stage's RandAugment of the same loader's crops without RandAugment, with
the same expected draws for the three backends (they differ only by their decoders and resizers)."""
import numpy as np
import pytest
import torch

from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
from fastlivt.data import device_randaugment as dra
from fastlivt.data.device_stage import DeviceStage
from convert_testdata import convert_imagefolder
from image_folders import no_numba_jit, textured_jpegs  # noqa: F401 (an autouse fixture)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POLICY = "rand-m9-mstd0.5-inc1"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """20 textured JPEGs (smooth colour fields plus noise) of varied sizes in 2 classes, in both formats."""
    root = tmp_path_factory.mktemp("shared-ra")
    textured_jpegs(root / "src", [12, 8], (36, 80), seed=3)
    return convert_imagefolder(root / "src", root / "out")


def _uint8_epoch(out, backend, *over) -> torch.Tensor:
    """One finetune epoch of ``backend``, its normalised images turned back into 0..255 integers."""
    cfg = load_config(TrainConfig, None, [f"data.train={out}", f"data.backend={backend}", "data.img_size=24",
                                          "data.batch_size=6", "data.workers=0", "data.dali_device=cpu",
                                          "data.rrc_scale=[0.08,1.0]", "run.seed=5", *over])
    with build_loader(cfg, "train", "finetune") as loader:
        images = torch.cat([x.clone() for x, _ in loader])
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    values = images * std + mean
    assert (values - values.round()).abs().max() < 1e-3  # normalised integers
    return values.round().to(torch.uint8)


@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_backend_applies_the_shared_device_rand_augment_with_the_samples_draws(split, backend):
    crops = _uint8_epoch(split, backend, "data.auto_augment=")
    augmented = _uint8_epoch(split, backend, f"data.auto_augment={POLICY}")
    # epoch 0, one rank, no resume: sample k of the epoch sits at global position k
    stage = DeviceStage(MEAN, STD, torch.device("cpu"), 5, dra.parse_policy(POLICY))
    expected = stage.augment(crops, stage.draws(0, np.arange(crops.shape[0]), crops.device))
    assert torch.equal(augmented, expected)
    changed = (augmented != crops).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 1.0  # p = 0.5 per op, 2 ops: about 3/4 of the samples change



@pytest.mark.parametrize("backend", ["dali"])  # ffcv hands over stored bytes: test_ffcv_rows.py
def test_hand_over_only_yields_the_uint8_crops_before_the_device_stage(split, backend):
    """What `fastlivt bench data` times as the host's part: the loader's uint8 crops, RandAugment not applied."""
    crops = _uint8_epoch(split, backend, "data.auto_augment=")
    cfg = load_config(TrainConfig, None, [f"data.train={split}", f"data.backend={backend}", "data.img_size=24",
                                          "data.batch_size=6", "data.workers=0", "data.dali_device=cpu",
                                          "data.rrc_scale=[0.08,1.0]", "run.seed=5", f"data.auto_augment={POLICY}"])
    with build_loader(cfg, "train", "finetune") as loader:
        loader.hand_over_only = True
        handed = torch.cat([x.clone() for x, _ in loader])
    assert handed.dtype == torch.uint8 and torch.equal(handed, crops)


@pytest.fixture(scope="module")
def raw_split(tmp_path_factory):
    """The 20 JPEGs of ``split`` converted again with FFCV's raw mode: the .beton holds the decoded pixels, the
    shards the JPEG files themselves."""
    from fastlivt.data_prep.cli import main

    root = tmp_path_factory.mktemp("shared-crop")
    textured_jpegs(root / "src", [6, 4], (30, 70), seed=8)
    out = root / "out"
    assert main(["imagefolder", "--root", str(root / "src"), "--formats", "ffcv,dali", "--out", str(out),
                 "--workers", "0", "--write-mode", "raw", "--shard-size", "10", "--no-progress"]) == 0
    return out


def test_ffcv_raw_and_torch_backends_give_the_same_pixels(raw_split):
    """One crop for every backend: on lossless storage, the ffcv backend's batches are the torch backend's, bit for
    bit, in training (same windows, flips and RandAugment draws) and evaluation (same resize and center crop)."""
    from torchvision.io import decode_jpeg

    from fastlivt.data_prep.manifest import load_manifest
    from fastlivt.data.shards import ShardReader
    from convert_testdata import beton_stored

    shards = ShardReader(load_manifest(raw_split))
    for i, (h, w, mode, data) in enumerate(beton_stored(raw_split / "train.beton")):
        assert mode == 1  # raw
        pixels = torch.from_numpy(data.copy()).view(h, w, 3).permute(2, 0, 1)
        assert torch.equal(pixels, decode_jpeg(torch.from_numpy(shards[i]))), i  # what the torch backend decodes
    for over in (["data.auto_augment="], [f"data.auto_augment={POLICY}"]):
        ffcv = _uint8_epoch(raw_split, "ffcv", *over)
        assert torch.equal(ffcv, _uint8_epoch(raw_split, "torch", *over))
    evaluated = []
    for backend in ("ffcv", "torch"):
        cfg = load_config(TrainConfig, None, [f"data.val={raw_split}", f"data.backend={backend}", "data.img_size=24",
                                              "data.batch_size=6", "data.workers=0", "data.eval_crop_pct=0.875"])
        with build_loader(cfg, "val", "eval") as loader:
            evaluated.append(torch.cat([x.clone() for x, _ in loader]))
    assert torch.equal(evaluated[0], evaluated[1])


def test_device_stage_dispatches_the_same_operations_for_any_batch():
    """A fixed number of operations per batch (each a kernel launch on a GPU), RandAugment and normalisation."""
    from fastlivt.data.ra_fidelity import dispatched_ops, fidelity_images

    stage = DeviceStage(MEAN, STD, torch.device("cpu"), 0, dra.parse_policy(POLICY))
    counts = []
    for b in (3, 17):
        images = torch.from_numpy(fidelity_images(b, 16)).permute(0, 3, 1, 2)
        draws = stage.draws(0, np.arange(b), images.device)
        counts.append(dispatched_ops(lambda: stage.apply(images, draws)))
    assert counts[0] == counts[1] > 50

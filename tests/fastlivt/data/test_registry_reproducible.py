"""Same seed, same batches: the ffcv and dali loaders' images and labels in every stage, with any number of workers,
across a resume (set_epoch + skip), and a clean process exit after iterating them."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
from fastlivt.data import sample_rng
from convert_testdata import convert_imagefolder
from image_folders import no_numba_jit, noise_jpegs  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """24 random-noise JPEGs of varied sizes in 3 classes, converted to both formats."""
    root = tmp_path_factory.mktemp("repro")
    noise_jpegs(root / "src", [12, 8, 4], (30, 90), seed=1)
    return convert_imagefolder(root / "src", root / "out")


def _cfg(out, backend, workers, *over):
    return load_config(TrainConfig, None, [f"data.train={out}", f"data.val={out}", f"data.backend={backend}",
                                           "data.img_size=24", "data.batch_size=5", f"data.workers={workers}",
                                           "data.dali_device=cpu", "run.seed=11", "run.epochs=3", *over])


def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.clone())
        ys.append(y.clone())
    return torch.cat(xs), torch.cat(ys)


STAGE_OVERRIDES = {"pretrain": ["data.rrc_scale=[0.2,1.0]"],
                   "finetune": ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.sampler=class_balanced"],
                   "eval": []}


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "eval"])
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_same_seed_same_batches_any_workers_and_resume(split, backend, stage):
    over = STAGE_OVERRIDES[stage]
    which = "val" if stage == "eval" else "train"
    with build_loader(_cfg(split, backend, 1, *over), which, stage) as one, \
            build_loader(_cfg(split, backend, 2, *over), which, stage) as two:
        epochs = [[_epoch(one) for _ in range(2)], [_epoch(two) for _ in range(2)]]
    for e in range(2):
        assert torch.equal(epochs[0][e][0], epochs[1][e][0]), f"epoch {e}: images differ with 1 and 2 workers"
        assert torch.equal(epochs[0][e][1], epochs[1][e][1])
    if stage == "eval":
        assert torch.equal(epochs[0][0][0], epochs[0][1][0])  # no randomness at evaluation
        return
    assert not torch.equal(epochs[0][0][0], epochs[0][1][0])  # a new epoch draws new augmentations
    with build_loader(_cfg(split, backend, 2, *over), which, stage) as resumed:
        resumed.set_epoch(1)
        resumed.seek(2 * 5, len(resumed) * 5)  # two batches of 5 into epoch 1, on one rank
        images, labels = _epoch(resumed)
    assert torch.equal(images, epochs[0][1][0][2 * 5:]) and torch.equal(labels, epochs[0][1][1][2 * 5:])
    with build_loader(_cfg(split, backend, 1, *over, "run.seed=12"), which, stage) as other:
        assert not torch.equal(_epoch(other)[0], epochs[0][0][0])


def test_sample_params_are_pure_and_in_range():
    keys = sample_rng.sample_keys(3, 1, np.arange(5000))
    assert np.array_equal(keys, sample_rng.sample_keys(3, 1, np.arange(5000)))
    assert len(set(keys.tolist())) == 5000
    for other in (sample_rng.sample_keys(4, 1, np.arange(5000)), sample_rng.sample_keys(3, 2, np.arange(5000))):
        assert not np.isin(other, keys).any()
    heights, widths = np.full(5000, 60), np.full(5000, 90)
    top, left, h, w = sample_rng.rrc_windows(keys, heights, widths, (0.25, 1.0)).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 90).all()
    area, aspect = h * w / 5400, w / h
    assert area.min() > 0.2 and area.max() <= 1.0 and aspect.min() > 0.7 and aspect.max() < 1.4
    assert abs(sample_rng.flips(keys).mean() - 0.5) < 0.03
    # the global positions of the W ranks' plans tile the epoch: parameters do not depend on the world size
    tiles = np.sort(np.concatenate([sample_rng.epoch_positions(r, 3, 0, 4) for r in range(3)]))
    assert np.array_equal(tiles, np.arange(12))


def test_rrc_windows_follow_torchvision_get_params():
    from torchvision.transforms import RandomResizedCrop

    keys = sample_rng.sample_keys(5, 0, np.arange(4000))
    H, W = np.full(4000, 200), np.full(4000, 300)
    top, left, h, w = sample_rng.rrc_windows(keys, H, W, (0.08, 1.0)).T
    torch.manual_seed(0)  # torchvision's own sampling as the reference distribution
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, 200, 300), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(4000)])
    assert abs((h * w).mean() - (ref[:, 2] * ref[:, 3]).mean()) / 60000 < 0.02
    assert abs(np.log(w / h).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
    assert abs((top / (200 - h + 1)).mean() - 0.5) < 0.03
    # no attempt fits a 10 x 100 strip at scale >= 0.9: the center crop of ratio 4/3 (h 10, w round(13.33))
    fb = sample_rng.rrc_windows(keys[:3], np.full(3, 10), np.full(3, 100), (0.9, 1.0))
    assert fb[0].tolist() == [0, 43, 10, 13]


_EXIT_SCRIPT = r"""
import sys
from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
out, backend = sys.argv[1], sys.argv[2]
cfg = load_config(TrainConfig, None, [f"data.train={out}", f"data.backend={backend}", "data.img_size=24",
                                      "data.batch_size=4", "data.workers=2", "data.dali_device=cpu",
                                      "data.auto_augment=rand-m9-mstd0.5-inc1"])
left = build_loader(cfg, "train", "finetune")   # left midway, never closed: the exit handler stops it
for i, _ in enumerate(left):
    if i == 1:
        break
with build_loader(cfg, "train", "pretrain") as whole:
    for _ in whole:
        pass
it = iter(build_loader(cfg, "train", "pretrain"))  # an iterator alive at exit
next(it)
print("ITERATED")
"""


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_process_exits_cleanly_after_iterating(split, backend, tmp_path):
    """With numba's JIT on (the real configuration): exit status 0 and no C++ abort at interpreter exit."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(split), backend], capture_output=True, text=True,
                          timeout=540, env=env, cwd=REPO)
    assert "ITERATED" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-3000:]

"""The ffcv and dali loaders against the torch reference on one conversion of generated, identifiable images.

Each generated image is one flat colour (its generation id in base 6, 40 levels per digit) with a gentle gradient,
so the id of any crop can be read back from its mean colour: that lets the tests check the exact sample order.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
from image_folders import no_numba_jit  # noqa: F401 (autouse; one test below turns the JIT on)

COUNTS = [45, 25, 13, 7]  # a long tail of 4 classes, N = 90
N = sum(COUNTS)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
pytestmark = pytest.mark.timeout(300)


def _colour(gid: int) -> np.ndarray:
    return np.array([20 + 40 * ((gid // 6 ** k) % 6) for k in range(3)], dtype=np.float64)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """An imagefolder of N identifiable JPEGs converted with ``python -m fastlivt.data_prep`` (ffcv + dali formats)."""
    root = tmp_path_factory.mktemp("lt")
    rng = np.random.default_rng(0)
    gid, gid_label = 0, []
    for c, n in enumerate(COUNTS):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for _ in range(n):
            h, w = rng.integers(48, 96, 2)
            ramp = np.linspace(-8, 8, w)[None, :, None]
            img = np.clip(_colour(gid)[None, None, :] + ramp, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(img, (h, w, 3)).copy()).save(root / "src" / f"c{c}" / f"{gid}.jpg", quality=95)
            gid_label.append(c)
            gid += 1
    out = root / "out"
    from fastlivt.data_prep.cli import main as convert

    assert convert(["imagefolder", "--root", str(root / "src"), "--formats", "ffcv,dali", "--out", str(out),
                    "--workers", "1", "--shard-size", "40", "--no-progress"]) == 0
    return out, np.array(gid_label)


def _cfg(out, backend, *over):
    base = [f"data.train={out}", f"data.val={out}", f"data.backend={backend}", "data.img_size=32",
            "data.batch_size=16", "data.workers=1", "run.seed=7", "run.epochs=4"]
    return load_config(TrainConfig, None, base + list(over))


def _ids(images: torch.Tensor) -> np.ndarray:
    """Generation ids read back from the mean colour of normalised images."""
    rgb = images.double().mean((2, 3)) * torch.tensor(STD, dtype=torch.float64) * 255 + torch.tensor(MEAN, dtype=torch.float64) * 255
    digits = torch.clamp(torch.round((rgb - 20) / 40), 0, 5).long()
    return (digits[:, 0] + 6 * digits[:, 1] + 36 * digits[:, 2]).numpy()


def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
        xs.append(x.clone())
        ys.append(y.numpy().copy())
    return torch.cat(xs), np.concatenate(ys)


@pytest.fixture(scope="session")
def reference(converted):
    """The torch backend's sequential read: written sample i -> generation id, and its eval images."""
    out, gid_label = converted
    images, labels = _epoch(build_loader(_cfg(out, "torch"), "val", "eval"))
    written_gid = _ids(images)
    return written_gid, images, labels


def test_reference_reads_every_written_sample(converted, reference):
    out, gid_label = converted
    written_gid, _, labels = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_counts"] == COUNTS
    assert sorted(written_gid.tolist()) == list(range(N))  # each image written once, read back by key
    assert np.array_equal(gid_label[written_gid], labels)
    assert np.array_equal(labels, np.load(out / "labels.npy"))


@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
def test_pretrain_order_is_the_sampler_plan(converted, reference, backend):
    out, _ = converted
    written_gid = reference[0]
    loader = build_loader(_cfg(out, backend, "data.drop_last=false"), "train", "pretrain")
    assert len(loader) == -(-N // 16) and loader.batch_augment is None
    for epoch in range(2):
        images, labels = _epoch(loader)
        plan = loader.plan(epoch)
        assert sorted(plan.tolist()) == list(range(N))  # instance sampling: every index once per epoch
        assert np.array_equal(_ids(images), written_gid[plan]), f"{backend} epoch {epoch}: images not in plan order"
        assert np.array_equal(labels, loader.labels[plan])
        assert np.array_equal(np.bincount(labels, minlength=4), COUNTS)  # same label multiset as the data
    assert not np.array_equal(loader.plan(0), loader.plan(1))
    again = build_loader(_cfg(out, backend, "data.drop_last=false"), "train", "pretrain")
    assert np.array_equal(again.plan(1), loader.plan(1))  # a pure function of (seed, epoch)
    other_seed = build_loader(_cfg(out, backend, "data.drop_last=false", "run.seed=8"), "train", "pretrain")
    assert not np.array_equal(other_seed.plan(1), loader.plan(1))


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_eval_images_match_torch_reference(converted, reference, backend):
    out, _ = converted
    _, ref_images, ref_labels = reference
    loader = build_loader(_cfg(out, backend), "val", "eval")
    sizes = [y.shape[0] for _, y in loader]
    assert sizes == [16] * 5 + [N - 80]  # no drop_last at eval: the last batch is partial
    images, labels = _epoch(loader)
    assert np.array_equal(labels, ref_labels)
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    per_channel = images.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values.numpy() >= lo - 1e-4).all() and (per_channel.max(1).values.numpy() <= hi + 1e-4).all()
    torch.testing.assert_close(images.mean((0, 2, 3)), ref_images.mean((0, 2, 3)), atol=0.02, rtol=0)
    torch.testing.assert_close(images.std((0, 2, 3)), ref_images.std((0, 2, 3)), atol=0.02, rtol=0)
    assert (images - ref_images).abs().mean() < 0.05  # same crops, up to resize/JPEG differences


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_class_balanced_histogram_on_backend(converted, backend):
    out, _ = converted
    loader = build_loader(_cfg(out, backend, "data.sampler=class_balanced"), "train", "pretrain")
    labels = np.concatenate([_epoch(loader)[1] for _ in range(4)])
    assert labels.size == 4 * len(loader) * 16
    observed = np.bincount(labels, minlength=4)
    expected = labels.size / 4
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 21.1, observed  # chi-square, 3 degrees of freedom, p = 1e-4
    assert np.array_equal(labels, np.concatenate([loader.labels[loader.plan(e)] for e in range(4)]))


@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
def test_resume_mid_epoch_with_set_epoch_and_seek(converted, backend):
    out, _ = converted
    from fastlivt.data.contract import BatchLoader

    loader = build_loader(_cfg(out, backend, "data.sampler=square_root"), "train", "pretrain")
    assert isinstance(loader, BatchLoader) and loader.num_samples == N  # the written contract, on each backend
    assert len(loader) == N // 16
    loader.set_epoch(2)
    full = _epoch(loader)[1]
    assert loader.epoch == 3  # a completed pass moves to the next epoch
    resumed = build_loader(_cfg(out, backend, "data.sampler=square_root"), "train", "pretrain")
    resumed.set_epoch(2)
    resumed.seek(3 * 16, len(resumed) * 16)  # three batches of 16 into epoch 2, on one rank
    tail = _epoch(resumed)[1]
    assert np.array_equal(tail, full[3 * 16:])
    it = iter(resumed)  # a pass left midway, then a new epoch: no stale batches
    next(it)
    resumed.set_epoch(0)
    assert np.array_equal(_epoch(resumed)[1], resumed.labels[resumed.plan(0)])


def test_finetune_ffcv_with_jit_randaugment_and_batch_augment(converted):
    """The one FFCV test with numba compilation on: BFT's pipeline end to end."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(True)
    out, _ = converted
    cfg = _cfg(out, "ffcv", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0",
               "data.smoothing=0.1", "data.reprob=0.25", "data.rrc_scale=[0.08,1.0]")
    loader = build_loader(cfg, "train", "finetune")
    images, target = next(iter(loader))  # the loader applies the batch augmentation: a MixTarget
    assert images.shape == (16, 3, 32, 32) and target.label_a.dtype == torch.int64 and torch.isfinite(images).all()
    assert np.array_equal(target.label_a.numpy(), loader.labels[loader.plan(0)[:16]])
    dense = target.dense(4, torch.float64)
    torch.testing.assert_close(dense.sum(1), torch.ones(16, dtype=torch.float64))
    assert torch.equal(target.label_b, target.label_a.flip(0)) and 0 <= target.lam <= 1 and target.smoothing == 0.1
    assert target.lam == loader.batch_augment.draws(0, np.arange(16), 32, 32).mix.lam


def test_finetune_dali_randaugment_runs(converted):
    out, _ = converted
    cfg = _cfg(out, "dali", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.dali_device=cpu")
    loader = build_loader(cfg, "train", "finetune")
    images, labels = _epoch(loader)
    assert images.shape == (len(loader) * 16, 3, 32, 32) and torch.isfinite(images).all()
    assert np.array_equal(labels, loader.labels[loader.plan(0)])


def test_backends_are_found_by_name_and_log_under_their_own_module():
    import importlib
    import typing

    from fastlivt.config import DataConfig
    from fastlivt.data.registry import BACKENDS, backend_class

    assert BACKENDS == typing.get_args(typing.get_type_hints(DataConfig)["backend"])  # the registry and the config agree
    for name in BACKENDS:
        cls = backend_class(name)
        module = importlib.import_module(cls.__module__)
        assert cls.backend == name and module.__name__ == f"fastlivt.data.{name}_loader"
        assert module.log.name == module.__name__
    cfg = load_config(TrainConfig, None, [])
    cfg.data.backend = "jax"  # past the config's own check: the registry names the choices too
    with pytest.raises(ValueError, match=r"data.backend: unknown backend 'jax' \(choose one of ffcv, dali, torch\)"):
        build_loader(cfg, "train", "pretrain")

def test_bad_configuration_is_a_clear_error(converted, tmp_path):
    out, _ = converted
    with pytest.raises(ValueError, match="data.backend: expected one of ffcv, dali, torch, got 'jax'"):  # at load
        build_loader(_cfg(out, "jax"), "train", "pretrain")
    with pytest.raises(ValueError, match="data.val is empty"):
        build_loader(_cfg(out, "torch", "data.val="), "val", "eval")
    with pytest.raises(ValueError, match="even"):
        build_loader(_cfg(out, "torch", "data.batch_size=15", "data.mixup=0.8"), "train", "finetune")
    with pytest.raises(Exception, match="no manifest"):
        build_loader(_cfg(tmp_path, "torch"), "train", "pretrain")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            build_loader(_cfg(out, "dali", "data.dali_device=gpu"), "train", "pretrain")


_RANK_SCRIPT = r"""
import json, sys, numpy as np
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)
from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
out, rank = sys.argv[1], int(sys.argv[2])
res = {}
for backend in ("ffcv", "dali"):
    cfg = load_config(TrainConfig, None, [f"data.train={out}", f"data.backend={backend}", "data.img_size=32",
                                          "data.batch_size=8", "data.workers=1", "run.seed=3", "data.drop_last=false"])
    loader = build_loader(cfg, "train", "pretrain", rank=rank, world=2)
    loader.set_epoch(1)
    labels, ids = [], []
    for x, y in loader:
        rgb = x.double().mean((2, 3)).numpy() * np.array([0.229, 0.224, 0.225]) * 255 + np.array([0.485, 0.456, 0.406]) * 255
        d = np.clip(np.round((rgb - 20) / 40), 0, 5).astype(int)
        ids += (d[:, 0] + 6 * d[:, 1] + 36 * d[:, 2]).tolist()
        labels += y.tolist()
    res[backend] = {"len": len(loader), "batches": -(-len(ids) // 8), "ids": ids, "labels": labels}
print("RESULT" + json.dumps(res))
"""


@pytest.mark.slow
def test_two_ranks_in_two_processes_split_the_epoch(converted, reference, tmp_path):
    out, _ = converted
    written_gid = reference[0]
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = dict(os.environ, RANK="0")
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r))) for r in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT", 1)[1]))
    for backend in ("ffcv", "dali"):
        r0, r1 = results[0][backend], results[1][backend]
        assert r0["len"] == r1["len"] == r0["batches"] == r1["batches"] == -(-(N // 2) // 8)
        ids0, ids1 = np.array(r0["ids"]), np.array(r1["ids"])
        assert len(ids0) == len(ids1) == N // 2
        assert not set(ids0) & set(ids1) and set(ids0) | set(ids1) == set(range(N))  # disjoint, covering
        gid_to_written = np.argsort(written_gid)
        for rank, ids in ((0, ids0), (1, ids1)):
            loader = build_loader(_cfg(out, backend, "run.seed=3", "data.batch_size=8", "data.drop_last=false"),
                                  "train", "pretrain",
                                  rank=rank, world=2)
            assert np.array_equal(gid_to_written[ids], loader.plan(1))  # the order each rank read is its plan


@pytest.mark.cuda
@pytest.mark.parametrize("backend,extra", [("ffcv", []), ("dali", ["data.dali_device=gpu"]), ("dali", ["data.dali_device=auto"]),
                                           ("torch", [])])
def test_cuda_loaders_follow_the_plan(converted, reference, backend, extra):
    """On a GPU: batches land on the device (DALI decodes with nvJPEG), in the plan's order, BFT batch ops on the GPU."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(True)
    out, _ = converted
    written_gid = reference[0]
    loader = build_loader(_cfg(out, backend, "data.drop_last=false", *extra), "train", "pretrain", device="cuda")
    if backend == "dali":
        assert loader.dali_device == "mixed"
    images, labels = [], []
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
        images.append(x.cpu())
        labels.append(y.cpu().numpy())
    assert np.array_equal(_ids(torch.cat(images)), written_gid[loader.plan(0)])
    assert np.array_equal(np.concatenate(labels), loader.labels[loader.plan(0)])
    ft = build_loader(_cfg(out, backend, "data.auto_augment=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0",
                           "data.smoothing=0.1", "data.reprob=0.25", *extra), "train", "finetune", device="cuda")
    x, target = next(iter(ft))  # augmented by the loader on the device
    assert x.is_cuda and torch.isfinite(x).all() and target.dense(4).is_cuda

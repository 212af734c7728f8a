"""The torch backend: batched torchvision decoding, per-sample crops from (seed, epoch, index), workers-independent
batches; on CPU tensors here, on CUDA (nvJPEG) in the tests marked ``cuda``.

The generated images carry a known pattern: red = 2 x column, green = 2 x row (blue = a per-image constant), so the
window a crop was taken from can be read back from its pixels.
"""
import io
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastlivt.data_prep.manifest import load_manifest
from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
from fastlivt.data import device_decode as dd
from fastlivt.data.pil_loader import PILLoader
from fastlivt.data.sample_rng import train_params
from fastlivt.data.shards import ShardReader

COUNTS = [14, 8, 5, 3]
N = sum(COUNTS)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
pytestmark = pytest.mark.timeout(300)


def _pattern(h: int, w: int, blue: int) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([2 * cols, 2 * rows, np.full((h, w), blue)], -1).astype(np.uint8)


def _write_split(out, shard_size: int = 12):
    """A split in the converter's layout written by hand (webdataset tars of KEY.jpg + KEY.lbl, labels.npy,
    manifest.json without .idx files), so these tests need only torch, torchvision and Pillow."""
    import tarfile

    from fastlivt.data_prep.manifest import Manifest

    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    shards, sizes = [], []
    for first in range(0, N, shard_size):
        shards.append(f"train-{len(shards):05d}.tar")
        sizes.append(min(shard_size, N - first))
        with tarfile.open(out / shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, first + sizes[-1]):
                h, w = (int(v) for v in rng.integers(60, 120, 2))
                buf = io.BytesIO()
                Image.fromarray(_pattern(h, w, 10 + 7 * i)).save(buf, format="JPEG", quality=95)
                for ext, data in (("jpg", buf.getvalue()), ("lbl", np.int32(labels[i]).tobytes())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    np.save(out / "labels.npy", labels)
    Manifest(source="test", split="train", num_classes=len(COUNTS), class_names=[f"c{c}" for c in range(len(COUNTS))],
             class_counts=COUNTS, num_samples=N, dali_shards=shards, shard_sizes=sizes).save(out)
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return _write_split(tmp_path_factory.mktemp("tl") / "out")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The same kind of images through the converter (needs FFCV and DALI): for the plan comparison."""
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    root = tmp_path_factory.mktemp("tlc")
    for c, n in enumerate(COUNTS):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for k in range(n):
            Image.fromarray(_pattern(64 + k, 90 - k, 10 + c)).save(root / "src" / f"c{c}" / f"{k}.jpg", quality=95)
    from fastlivt.data_prep.cli import main as convert

    out = root / "out"
    assert convert(["imagefolder", "--root", str(root / "src"), "--formats", "ffcv,dali", "--out", str(out),
                    "--workers", "1", "--shard-size", "12", "--no-progress"]) == 0
    return out


def _cfg(out, *over, backend="torch"):
    base = [f"data.train={out}", f"data.val={out}", f"data.backend={backend}", "data.img_size=32",
            "data.batch_size=8", "data.workers=0", "run.seed=11", "run.epochs=3"]
    return load_config(TrainConfig, None, base + list(over))


def _epoch(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255 floats."""
    return images.double() * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


# ------------------------------------------------------------------------------------------------ units
def test_decode_batch_matches_pil_and_reads_png_and_gray():
    rng = np.random.default_rng(0)
    rgb = [(rng.random((40 + 9 * k, 70 - 5 * k, 3)) * 255).astype(np.uint8) for k in range(3)]
    blobs = []
    for a in rgb:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=85)
        blobs.append(buf.getvalue())
    gray = io.BytesIO()
    Image.fromarray(rgb[0][..., 0]).save(gray, format="JPEG", quality=90)
    png = encode_png(torch.from_numpy(rgb[1]).permute(2, 0, 1))
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs + [gray.getvalue()]] + [png]
    out = dd.decode_batch(encoded, [f"s{k}" for k in range(5)], torch.device("cpu"))
    for k, blob in enumerate(blobs + [gray.getvalue()]):
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1)
        assert out[k].shape == ref.shape and out[k].dtype == torch.uint8
        diff = (out[k].int() - ref.int()).abs()
        assert diff.max() <= 3 and diff.float().mean() < 0.5  # libjpeg-turbo builds may differ by rounding
    assert torch.equal(out[4], torch.from_numpy(rgb[1]).permute(2, 0, 1))  # PNG is lossless


def test_undecodable_bytes_name_the_sample():
    good = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
    junk = torch.frombuffer(bytearray(b"NOT AN IMAGE AT ALL"), dtype=torch.uint8)
    with pytest.raises(dd.UndecodableSample, match="shard-3.tar:7.jpg: not an image"):
        dd.decode_batch([good, junk], ["a", "shard-3.tar:7.jpg"], torch.device("cpu"))
    broken = good.clone()
    broken[20:] = 0x55
    with pytest.raises(dd.UndecodableSample, match="b.jpg: corrupt JPEG"):
        dd.decode_batch([good, broken], ["a.jpg", "b.jpg"], torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ the loader
def test_pretrain_crops_follow_the_per_sample_parameters(split):
    loader = build_loader(_cfg(split), "train", "pretrain")
    loader.set_epoch(1)
    images, labels = _epoch(loader)
    plan = loader.plan(1)
    assert np.array_equal(labels.numpy(), loader.labels[plan])
    reader = ShardReader(loader.manifest)
    pils = [Image.open(io.BytesIO(reader[int(i)].tobytes())).convert("RGB") for i in plan]
    H, W = np.array([p.height for p in pils]), np.array([p.width for p in pils])
    params = train_params(11, 1, loader.positions(plan), H, W, (0.2, 1.0))
    (top, left, h, w), flip = params.windows.T, params.flip
    got = _to_pixels(images)
    for k, pil in enumerate(pils):  # torchvision's PIL path as the independent reference
        ref = TF.resized_crop(pil, int(top[k]), int(left[k]), int(h[k]), int(w[k]), [32, 32], InterpolationMode.BICUBIC)
        ref = torch.from_numpy(np.array(TF.hflip(ref) if flip[k] else ref)).permute(2, 0, 1).double()
        assert (got[k] - ref).abs().mean() < 3, k
        if flip[k]:
            assert (got[k] - ref.flip(-1)).abs().mean() > 10  # the flip is visible in the pattern
    assert 0 < flip.sum() < flip.size


@pytest.mark.parametrize("stage,extra", [("pretrain", []), ("finetune", ["data.auto_augment=rand-m9-mstd0.5-inc1"])])
def test_batches_do_not_depend_on_workers_or_instance(split, stage, extra):
    runs = []
    for workers in (0, 1, 2):
        loader = build_loader(_cfg(split, f"data.workers={workers}", *extra), "train", stage)
        py, npy = random.getstate(), np.random.get_state()[1].copy()
        runs.append([_epoch(loader) for _ in range(2)])
        assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy)  # globals untouched
    again = build_loader(_cfg(split, *extra), "train", stage)
    runs.append([_epoch(again) for _ in range(2)])
    for other in runs[1:]:
        for (x0, y0), (x1, y1) in zip(runs[0], other):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # epochs differ
    seed = build_loader(_cfg(split, "run.seed=12", *extra), "train", stage)
    assert not torch.equal(_epoch(seed)[0], runs[0][0][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_in_the_loader_thread_gives_the_same_batches(split, workers):
    """CUDA's layout (workers only read bytes; the loader's thread decodes and crops on the device), run on CPU."""
    cfg = _cfg(split, f"data.workers={workers}")
    reference = _epoch(build_loader(cfg, "train", "pretrain"))
    loader = build_loader(cfg, "train", "pretrain")
    loader.device_decode, loader.dataset.decode_here = True, False
    got = _epoch(loader)
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


def test_randaugment_changes_the_finetune_images(split):
    plain = _epoch(build_loader(_cfg(split), "train", "finetune"))[0]
    ra = build_loader(_cfg(split, "data.auto_augment=rand-m9-mstd0.5-inc1"), "train", "finetune")
    assert ra.path.startswith("CPU decode + crop + timm RandAugment rand-m9-mstd0.5-inc1 per sample")
    augmented = _epoch(ra)[0]
    changed = (plain - augmented).abs().flatten(1).mean(1) > 0.01
    assert changed.float().mean() > 0.5  # p=0.5 per op, 2 ops: most samples changed, crops identical otherwise


def test_finetune_randaugment_is_timms_policy_on_the_crops(split):
    """The loader's BFT images = timm's PIL RandAugment ops, with the samples' draws, on the same crops."""
    from fastlivt.data import device_randaugment as dra
    from fastlivt.data.ra_fidelity import diff_figures, timm_reference
    from fastlivt.data.ra_fidelity import timm_rand_augment
    from fastlivt.data.sample_rng import sample_keys

    config = "rand-m9-mstd0.5-inc1"
    crops = _to_pixels(_epoch(build_loader(_cfg(split), "train", "finetune"))[0]).round().clamp(0, 255)
    loader = build_loader(_cfg(split, f"data.auto_augment={config}"), "train", "finetune")
    got = _to_pixels(_epoch(loader)[0]).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    draws = dra.draw(dra.parse_policy(config), sample_keys(11, 0, loader.positions(loader.plan(0))), "bicubic")
    ra = timm_rand_augment(config, 32, MEAN, "bicubic")
    crops = crops.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = np.stack([timm_reference(ra, crops[k], draws, k) for k in range(len(crops))])
    assert (draws.applied.any(1)).mean() > 0.5 and np.mean(ref != crops) > 0.2
    figures = diff_figures(got, ref)
    assert figures["max"] <= 1 and figures["psnr"] >= 35.0, figures  # the same arithmetic as Pillow's, on the CPU


def test_plan_is_the_ffcv_and_dali_plan(converted):
    over = ["data.sampler=class_balanced", "data.drop_last=false"]
    t = build_loader(_cfg(converted, *over), "train", "pretrain")
    f = build_loader(_cfg(converted, *over, backend="ffcv"), "train", "pretrain")
    d = build_loader(_cfg(converted, *over, "data.dali_device=cpu", backend="dali"), "train", "pretrain")
    assert len(t) == len(f) == len(d)
    for e in range(3):
        assert np.array_equal(t.plan(e), f.plan(e)) and np.array_equal(t.plan(e), d.plan(e))
    assert np.array_equal(_epoch(t)[1].numpy(), t.labels[t.plan(0)])


def test_eval_is_resize_center_crop_normalised(split):
    loader = build_loader(_cfg(split, "data.eval_crop_pct=0.75"), "val", "eval")
    images, labels = _epoch(loader)
    assert images.shape == (N, 3, 32, 32) and images.dtype == torch.float32
    assert [y.shape[0] for _, y in loader] == [8, 8, 8, 6]
    assert np.array_equal(labels.numpy(), np.load(split / "labels.npy"))
    ref, _ = _epoch(PILLoader(_cfg(split, "data.eval_crop_pct=0.75"), "val", "eval"))
    assert (_to_pixels(images) - _to_pixels(ref)).abs().mean() < 1.5
    pix = _to_pixels(images)
    assert pix.min() > -0.5 and pix.max() < 255.5
    wide = _epoch(build_loader(_cfg(split, "data.eval_crop_pct=1.0"), "val", "eval"))[0]
    assert not torch.allclose(wide, images, atol=0.1)  # the crop percentage takes effect


def test_bad_shard_bytes_fail_naming_the_shard_and_sample(split, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(split, bad)
    reader = ShardReader(load_manifest(bad))
    for sample, data in ((13, b"GARBAGE!"), (3, b"\xff\xd8\xff\xdb" + b"\x55" * 60)):
        path, start = reader.paths[int(reader.shard[sample])], int(reader.offsets[sample])
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(data)
    loader = build_loader(_cfg(bad, "data.sampler=instance", "data.drop_last=false"), "val", "eval")
    with pytest.raises(dd.UndecodableSample, match=r"train-0000[01]\.tar: member 0000000(03|13)\.jpg \(sample (3|13)\)"):
        _epoch(loader)
    for workers in (0, 1):  # a worker's error reaches the caller too, and the loader can start again
        loader = build_loader(_cfg(bad, f"data.workers={workers}"), "train", "pretrain")
        with pytest.raises(dd.UndecodableSample):
            _epoch(loader)


# ------------------------------------------------------------------------------------------------ CUDA (nvJPEG)
@pytest.mark.cuda
def test_nvjpeg_decode_matches_cpu_decode(split):
    reader = ShardReader(load_manifest(split))
    encoded = [torch.from_numpy(reader[i]) for i in range(N)]
    names = [str(i) for i in range(N)]
    cpu = dd.decode_batch(encoded, names, torch.device("cpu"))
    gpu = dd.decode_batch(encoded, names, torch.device("cuda"))
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and a.shape == b.shape
        assert (a.int() - b.cpu().int()).abs().float().mean() < 1.5
    broken = encoded[3].clone()
    broken[40:] = 0x55
    with pytest.raises(dd.UndecodableSample, match="^3: corrupt JPEG"):
        dd.decode_batch(encoded[:3] + [broken], names[:4], torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("stage", ["pretrain", "eval"])
def test_cuda_loader_equals_cpu_loader_and_ignores_workers(split, stage):
    part = "val" if stage == "eval" else "train"
    cpu = _epoch(build_loader(_cfg(split), part, stage, device="cpu"))
    runs = [_epoch(build_loader(_cfg(split, f"data.workers={w}"), part, stage, device="cuda")) for w in (0, 2)]
    assert runs[0][0].is_cuda
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][1].cpu(), cpu[1])
    assert (_to_pixels(runs[0][0].cpu()) - _to_pixels(cpu[0])).abs().mean() < 2  # nvJPEG + float vs libjpeg + uint8
    ft = [build_loader(_cfg(split, "data.auto_augment=rand-m9-mstd0.5-inc1"), "train", "finetune", device=d)
          for d in ("cpu", "cuda")]
    x_cpu, x_gpu = _epoch(ft[0])[0], _epoch(ft[1])[0]
    assert x_gpu.is_cuda and ft[1].device_decode  # decode, crop and RandAugment on CUDA
    assert (_to_pixels(x_gpu.cpu()) - _to_pixels(x_cpu)).abs().mean() < 3  # nvJPEG vs libjpeg before the same ops

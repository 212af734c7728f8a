"""Small datasets in each source's exact on-disk format, and independent readers of the converted outputs.

Reference pixels come from the generated arrays (or OpenCV's decoder for JPEG files), never from the converter.
Readers use FFCV's Loader (JIT off, one worker, sequential, all rows) and a DALI CPU webdataset pipeline.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A distinct, JPEG-friendly H×W×3 uint8 image: random colour gradients plus a low-frequency wave."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    c0, cx, cy = rng.uniform(30, 140, 3), rng.uniform(0, 80, 3) / w, rng.uniform(0, 80, 3) / h
    phase = rng.uniform(0, 6.28)
    img = c0 + x[..., None] * cx + y[..., None] * cy + 15 * np.sin(x / w * 3.1 + y / h * 2.3 + phase)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode()).hexdigest()


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def save_jpeg(path: Path, pixels: np.ndarray, quality: int = 95) -> np.ndarray:
    """Write a JPEG and return its pixels as OpenCV decodes them (the reference for a JPEG source)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------- source formats
def make_files(root: Path, per_class: Sequence[int], size=(20, 24), seed: int = 0) -> List[Tuple[str, int, np.ndarray]]:
    """PNG files root/class_c/img_k.png; returns (relpath, label, pixels)."""
    rng = np.random.default_rng(seed)
    items = []
    for c, n in enumerate(per_class):
        for k in range(n):
            rel = f"class_{c}/img_{k:03d}.png"
            pixels = smooth_image(rng, *size)
            save_png(root / rel, pixels)
            items.append((rel, c, pixels))
    return items


def make_cifar(root: Path, kind: str, per_class: int, test_per_class: int = 2, seed: int = 0) -> Dict[str, List]:
    """The python pickle batches of CIFAR-10 (5 train batches + test_batch + batches.meta) or CIFAR-100
    (train + test + meta), rows in a shuffled class order; returns {split: [(label, HWC pixels)]}."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if kind == "cifar10" else 100
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n))
        pixels = np.stack([smooth_image(rng, 32, 32) for _ in labels])
        out[split] = list(zip(labels.tolist(), pixels))
        flat = pixels.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        if kind == "cifar10" and split == "train":
            parts = np.array_split(np.arange(len(labels)), 5)
            names = [f"data_batch_{k}" for k in range(1, 6)]
        else:
            parts, names = [np.arange(len(labels))], ["test_batch" if kind == "cifar10" else split]
        for name, rows in zip(names, parts):
            batch = {b"batch_label": name.encode(), label_key: labels[rows].tolist(), b"data": flat[rows],
                     b"filenames": [f"{r}.png".encode() for r in rows]}
            if kind == "cifar100":
                batch[b"coarse_labels"] = (labels[rows] // 5).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f)
    meta = ({b"label_names": [f"c10_{c}".encode() for c in range(10)], b"num_cases_per_batch": 10000}
            if kind == "cifar10" else {b"fine_label_names": [f"c100_{c}".encode() for c in range(100)],
                                       b"coarse_label_names": [f"s{c}".encode() for c in range(20)]})
    with open(folder / ("batches.meta" if kind == "cifar10" else "meta"), "wb") as f:
        pickle.dump(meta, f)
    return out


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist(root: Path, per_class: int, seed: int = 0) -> Dict[str, List]:
    """Fashion-MNIST IDX .gz files ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) with 28×28 grayscale images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", per_class), ("test", "t10k", 2)):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        images = np.stack([smooth_image(rng, 28, 28)[..., 0] for _ in labels])
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
        out[split] = list(zip(labels.tolist(), [np.repeat(im[..., None], 3, axis=2) for im in images]))
    return out


def read_fmnist_idx(root: Path, prefix: str) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N×28×28) and labels, parsed directly from the IDX files."""
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def ldam_subset(labels: np.ndarray, num_classes: int, factor: float, seed: int = 0) -> np.ndarray:
    """LDAM-DRW's imbalance_cifar.py, transcribed: img_max = len/cls_num, one global seed, shuffle per class."""
    img_max = len(labels) / num_classes
    img_num = [int(img_max * ((1.0 / factor) ** (i / (num_classes - 1.0)))) for i in range(num_classes)]
    np.random.seed(seed)
    targets_np = np.array(labels, dtype=np.int64)
    keep = []
    for the_class, the_img_num in zip(np.unique(targets_np), img_num):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        keep.append(idx[:the_img_num])
    return np.concatenate(keep)


# ----------------------------------------------------------------------------------------------------- readers
def read_beton(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """All rows of a .beton of equal-size images, in row order: (N×H×W×3 uint8, N labels)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    import torch

    jit, threads = Compiler.is_enabled, torch.get_num_threads()
    Compiler.set_enabled(False)  # skip numba's compile; FFCV's C decoder still runs (restored below for others)
    try:
        loader = Loader(str(path), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        os_cache=False, pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        images, labels = [], []
        for img, lbl in loader:
            images.append(np.array(img, copy=True))  # FFCV recycles its output buffers
            labels.append(np.array(lbl, copy=True).reshape(-1))
    finally:
        Compiler.set_enabled(jit)
        torch.set_num_threads(threads)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def beton_stored(path: Path) -> List[Tuple[int, int, int, np.ndarray]]:
    """Each row's image as stored in a .beton with an ``image`` field first: (height, width, mode (FFCV's: 0 jpg,
    1 raw), stored bytes), the bytes read from the file with numpy at the row's pointer, FFCV's reader for the
    tables."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta = reader.metadata["f0"]
    table = reader.alloc_table
    size_at = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    blob = np.fromfile(path, dtype=np.uint8)
    return [(int(m["height"]), int(m["width"]), int(m["mode"]),
             blob[int(m["data_ptr"]):int(m["data_ptr"]) + size_at[int(m["data_ptr"])]]) for m in meta]


def shard_members(directory: Path) -> List[List[str]]:
    """Member names of every shard, in manifest order, as Python's tarfile lists them."""
    import tarfile

    m = json.loads((directory / "manifest.json").read_text())
    out = []
    for name in m["dali_shards"]:
        with tarfile.open(directory / name) as t:
            out.append(t.getnames())
    return out


def read_shards(directory: Path) -> Tuple[List[np.ndarray], np.ndarray]:
    """All samples of the manifest's DALI shards, in order, decoded by a DALI CPU pipeline with the .idx files."""
    from nvidia.dali import fn, pipeline_def, types

    m = json.loads((directory / "manifest.json").read_text())
    n = m["num_samples"]

    @pipeline_def(batch_size=64, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(directory / s) for s in m["dali_shards"]],
            index_paths=[str(directory / s) for s in m["dali_index"]],
            ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], random_shuffle=False, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    images, labels = [], []
    while len(labels) < n:
        img, lbl = p.run()
        for k in range(len(img)):
            images.append(np.array(img.at(k)))
            labels.append(int(np.array(lbl.at(k)).reshape(-1)[0]))
    return images[:n], np.asarray(labels[:n], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ checks
def check_outputs(out: Path, reference: Sequence[Tuple[int, np.ndarray]], complete: bool = True,
                  exact: bool = True, jpeg_tol: float = 4.0) -> Dict:
    """Check a converted split against the (label, pixels) it should contain, and return its manifest as a dict.

    * every file in the manifest has the recorded size and sha256 (recomputed here with hashlib);
    * labels.npy, the .beton labels and the shard labels are the same sequence; class_counts is its histogram;
    * shard j holds keys j*shard_size... as KEY.jpg + KEY.lbl pairs;
    * each .beton row is (exactly, when ``exact``) a reference image with its label; with ``complete`` the rows are
      exactly the reference multiset;
    * each shard image is its .beton row within JPEG error (mean absolute difference below ``jpeg_tol``).
    """
    m = json.loads((out / "manifest.json").read_text())
    for name, meta in m["files"].items():
        data = (out / name).read_bytes()
        assert len(data) == meta["bytes"], name
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
    labels = np.load(out / "labels.npy")
    assert labels.shape == (m["num_samples"],)
    assert np.bincount(labels, minlength=m["num_classes"]).tolist() == m["class_counts"]

    rows, row_labels = read_beton(out / m["ffcv"])
    assert row_labels.tolist() == labels.tolist()
    wanted: Dict[Tuple[str, int], int] = {}
    for y, px in reference:
        wanted[(digest(px), int(y))] = wanted.get((digest(px), int(y)), 0) + 1
    if exact:
        found: Dict[Tuple[str, int], int] = {}
        for px, y in zip(rows, row_labels):
            key = (digest(px), int(y))
            assert key in wanted, f"written image with label {y} is not a reference image with that label"
            found[key] = found.get(key, 0) + 1
        if complete:
            assert found == wanted
    elif complete:
        assert len(rows) == len(reference)

    members = shard_members(out)
    assert [len(names) for names in members] == [2 * s for s in m["shard_sizes"]]
    flat = [n for names in members for n in names]
    assert flat == [f"{i:09d}.{ext}" for i in range(m["num_samples"]) for ext in ("jpg", "lbl")]
    size = m["shard_sizes"][0]
    assert all(s == size for s in m["shard_sizes"][:-1]) and sum(m["shard_sizes"]) == m["num_samples"]
    assert [f"{m['split']}-{j:05d}.tar" for j in range(len(members))] == m["dali_shards"]

    images, shard_labels = read_shards(out)
    assert shard_labels.tolist() == labels.tolist()
    for i, (a, b) in enumerate(zip(images, rows)):
        assert a.shape == b.shape, i
        err = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()
        assert err < jpeg_tol, f"shard image {i} differs from beton row {i} by {err:.2f} on average"
    return m


def convert_imagefolder(src: Path, out: Path) -> Path:
    """``fastlivt convert imagefolder`` of ``src`` (class folders of JPEGs) into ``out`` in both formats, in process
    (no workers, shards of 10 samples): the loaders' and resume tests' small splits."""
    from fastlivt.data_prep.cli import main

    assert main(["imagefolder", "--root", str(src), "--formats", "ffcv,dali", "--out", str(out), "--workers", "0",
                 "--shard-size", "10", "--no-progress"]) == 0
    return out

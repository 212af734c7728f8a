"""``fastlivt bench data``: loader throughput (images/s) and CPU-seconds per image, every backend against the PIL +
DataLoader baseline (``torch-pil``, :mod:`fastlivt.data.pil_loader`) measured in the same run, on the same data.

Backends: ``torch-pil`` (baseline), ``ffcv-jpg``, ``ffcv-raw``, ``dali-cpu``, ``dali-mixed`` (CUDA) and the torch
backend (``data.backend=torch``): ``torch-nvjpeg`` on CUDA (batched nvJPEG decode + crop on the GPU) or
``torch-decode-cpu`` (the same code on CPU tensors). A ``decode+crop`` row times that decode + RandomResizedCrop +
flip + normalise alone at 224 px on JPEGs held in memory (no reading, no threads), the figure to compare with the
training step's images/s; it needs only torch and torchvision (no conversion, no FFCV/DALI).

Datasets (built with the converter in a temporary directory):

* ``jpeg500``: synthetic ~500-px JPEGs (``fastlivt.data_prep.synthetic``), read at 224 px; FFCV in ``jpg`` and ``raw`` write
  modes (two conversions), DALI and torch from the jpg conversion's shards;
* ``fmnist``: Fashion-MNIST (28 px, from the Debian package) read at 32 px: the Fashion-MNIST-LT training split
  (G = 100) in the full run, the first 1,024 training images in the quick one.

Pipelines: MGP (``pretrain``: RandomResizedCrop + flip + normalise) and BFT (``finetune``: + RandAugment
rand-m9-mstd0.5-inc1, the device stage all backends share), loader only (BFT's batch Mixup/CutMix/erasing runs on
the device, the same for all backends). Each loader row also carries the host's CPU time per image up to the
hand-over (``extra.host_us_per_image``, what the host does in ``extra.host_does``) beside the full path's
(``full_cpu_us_per_image``); the ``device stage`` rows time the shared stage per batch
(:mod:`fastlivt.bench.data_stage`).
One warm-up pass (FFCV's numba compilation, DALI's graph build), then timed full epochs. CPU time is the process's
(all threads, ``time.process_time``) plus its finished children's (the DataLoader workers, ``RUSAGE_CHILDREN``).
``--quick`` uses few images and turns FFCV's numba JIT off (rows say so): its figures are a smoke test, not results.
"""
from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from fastlivt.data_prep.config import ConvertConfig
from fastlivt.bench.common import Row, device_name, sync, unavailable
from fastlivt.bench.data_stage import attach_host_time, device_stage_rows, torch_host_seconds
from fastlivt.config import TrainConfig, load_config
from fastlivt.logs import get_logger

log = get_logger(__name__)
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
PIPELINES = {"MGP": "pretrain", "BFT": "finetune"}
BASELINE = "torch-pil"


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _convert(out: Path, **fields) -> Path:
    from fastlivt.data_prep.convert import convert

    convert(ConvertConfig(out=str(out), **fields), progress=False)
    return out


def _fmnist_subset_folder(out: Path, count: int) -> Path:
    """The first ``count`` Fashion-MNIST training images as PNG files of an image folder (class_<label>/)."""
    import gzip

    from PIL import Image

    with gzip.open(f"{FMNIST_ROOT}/train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    with gzip.open(f"{FMNIST_ROOT}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    for k, (img, label) in enumerate(zip(images, labels)):
        path = out / f"class_{label}" / f"{k:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return out


def build_inputs(tmp: Path, quick: bool) -> Dict[str, Dict[str, object]]:
    """Converted datasets: name -> {'jpg': dir, 'raw': dir | None, 'size': output px, 'batch': batch size, 'note'}."""
    from fastlivt.data_prep.synthetic import write_folder

    workers = 0  # decode in this process: the converter's fork pool can deadlock in a process that already has threads
    sets: Dict[str, Dict[str, object]] = {}
    n500 = 96 if quick else 1024
    write_folder(tmp / "jpeg500-src", n500, 500)
    src = str(tmp / "jpeg500-src")
    sets["jpeg500"] = {
        "jpg": _convert(tmp / "jpeg500-jpg", source="imagefolder", root=src, workers=workers),
        "raw": _convert(tmp / "jpeg500-raw", source="imagefolder", root=src, workers=workers, formats=["ffcv"],
                        write_mode="raw"),
        "size": 224, "batch": 32 if quick else 64, "note": f"{n500} synthetic 500-px JPEGs",
    }
    if not Path(f"{FMNIST_ROOT}/train-images-idx3-ubyte.gz").is_file():
        sets["fmnist"] = {"unavailable": f"Fashion-MNIST not found in {FMNIST_ROOT} (apt-get install dataset-fashion-mnist)"}
        return sets
    if quick:
        folder = str(_fmnist_subset_folder(tmp / "fmnist-src", 1024))
        kw = dict(source="imagefolder", root=folder)
        note = "first 1,024 Fashion-MNIST images"
    else:
        kw = dict(source="fmnist", root=FMNIST_ROOT, split="train", imbalance_factor=100.0)
        note = "Fashion-MNIST-LT (G=100)"
    sets["fmnist"] = {
        "jpg": _convert(tmp / "fmnist-jpg", workers=workers, **kw),
        "raw": _convert(tmp / "fmnist-raw", workers=workers, formats=["ffcv"], write_mode="raw", **kw),
        "size": 32, "batch": 128, "note": note,
    }
    return sets


def measure(cfg: TrainConfig, stage: str, device: torch.device, repeats: int,
            pil_baseline: bool = False, hand_over_only: bool = False) -> Tuple[List[float], float, int]:
    """Images/s of each of ``repeats`` timed epochs, CPU-seconds per image over them, images per epoch
    (``pil_baseline``: the PIL reference loader instead of ``cfg.data.backend``; ``hand_over_only``: the loader
    stops at the hand-over to the shared device stage)."""
    from fastlivt.data import build_loader
    from fastlivt.data.pil_loader import PILLoader

    loader = PILLoader(cfg, "train", stage, device=device) if pil_baseline else build_loader(cfg, "train", stage, device=device)
    loader.hand_over_only = hand_over_only
    per_pass = len(loader) * loader.batch_size * loader.world  # positions of an epoch's batches over the world
    loader.seek(max(0, len(loader) - 2) * loader.batch_size * loader.world, per_pass)  # warm-up: the last two
    # batches of epoch 0 (compiles / builds)
    for _ in loader:
        pass
    rates, images, cpu0 = [], 0, _cpu_seconds()
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        for x, _y in loader:
            n += x.shape[0]
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
        images += n
    cpu = (_cpu_seconds() - cpu0) / images
    loader.close()  # its threads (FFCV's, DALI's) end here, not in a later process's fork
    return rates, cpu, images // repeats


def _variants(entry: Dict[str, object], device: torch.device) -> List[Tuple[str, Optional[str], List[str]]]:
    """(backend label, data dir or None, config overrides); the PIL baseline first."""
    jpg, raw = str(entry["jpg"]), entry.get("raw")
    torch_label = "torch-nvjpeg" if device.type == "cuda" else "torch-decode-cpu"
    out = [(BASELINE, jpg, ["data.backend=torch"]), (torch_label, jpg, ["data.backend=torch"]),
           ("ffcv-jpg", jpg, ["data.backend=ffcv"]),
           ("ffcv-raw", str(raw) if raw else None, ["data.backend=ffcv"]),
           ("dali-cpu", jpg, ["data.backend=dali", "data.dali_device=cpu"])]
    out.append(("dali-mixed", jpg if device.type == "cuda" else None, ["data.backend=dali", "data.dali_device=gpu"]))
    return out


def _synthetic_jpegs(count: int, size: int, seed: int = 0) -> List[torch.Tensor]:
    """``count`` JPEGs (quality 90, longest side ``size``, landscape and portrait) of smooth random content, encoded
    with torchvision (no other dependency)."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        h, w = (size * 3 // 4, size) if k % 2 == 0 else (size, size * 3 // 4)
        coarse = torch.rand((1, 3, max(2, h // 32), max(2, w // 32)), generator=g) * 255
        img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        img = img + torch.randint(-12, 13, img.shape, generator=g)
        out.append(encode_jpeg(img.clamp(0, 255).to(torch.uint8), quality=90))
    return out


def decode_rows(quick: bool, device: torch.device) -> List[Row]:
    """The torch backend's batched decode + RandomResizedCrop + flip + normalise at 224 px, on JPEGs in memory."""
    from fastlivt.data import device_decode as dd
    from fastlivt.data.augment import Normalize
    from fastlivt.data.torch_loader import Augmenter

    count, batch, repeats = (64, 32, 2) if quick else (1024, 256, 5)
    jpegs = _synthetic_jpegs(count, 500)
    names = [f"synthetic {k}" for k in range(count)]
    augment = Augmenter("pretrain", 224, 0, (0.2, 1.0), 256)
    normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device)
    backend = "torch-nvjpeg" if device.type == "cuda" else "torch-decode-cpu"

    def epoch(e: int) -> None:
        for k in range(0, count, batch):
            images = dd.decode_batch(jpegs[k:k + batch], names[k:k + batch], device)
            normalize(augment(images, np.arange(k, min(k + batch, count)), e))

    epoch(0)  # warm-up (nvJPEG handles, allocator)
    rates = []
    for r in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        epoch(r + 1)
        sync(device)
        rates.append(count / (time.perf_counter() - t0))
    where = "GPU (nvJPEG)" if device.type == "cuda" else "CPU tensors, the same code path"
    return [Row(part="data", name="decode+RRC+flip+normalise 224, in-memory JPEGs", backend=backend,
                device=device_name(device), shape=f"B={batch} 224x224 from 500x375", dtype="uint8->float32",
                unit="img/s", median=statistics.median(rates), spread=(max(rates) - min(rates)) / 2, repeats=repeats,
                extra={"images": count, "where": where, "threads": torch.get_num_threads()})]


def run_chunks(quick: bool, device: torch.device) -> Iterator[List[Row]]:
    """The decode and device-stage rows first (they need only torch and torchvision), written at once; then the
    loader rows."""
    yield decode_rows(quick, device)
    yield device_stage_rows(quick, device)
    yield _loader_rows(quick, device)


def _loader_rows(quick: bool, device: torch.device) -> List[Row]:
    rows: List[Row] = []
    dev = device_name(device)
    repeats = 1 if quick else 3
    try:
        from ffcv.pipeline.compiler import Compiler
    except ImportError as e:  # the converter needs FFCV (its resizer and JPEG encoder)
        for pipe in PIPELINES:
            rows.append(unavailable("data", f"{pipe} loaders", "all", device, f"converting the inputs needs ffcv: {e}"))
        return rows
    Compiler.set_enabled(not quick)
    try:
        with tempfile.TemporaryDirectory(prefix="fastlivt-bench-data-") as tmp:
            t0 = time.perf_counter()
            sets = build_inputs(Path(tmp), quick)
            log.info("bench data: inputs converted in %.1f s", time.perf_counter() - t0)
            for name, entry in sets.items():
                for pipe, stage in PIPELINES.items():
                    label = f"{pipe} {name}"
                    if "unavailable" in entry:
                        rows.append(unavailable("data", label, "all", device, str(entry["unavailable"])))
                        continue
                    rows += _rows_for(label, entry, stage, device, dev, repeats, quick)
    finally:
        Compiler.set_enabled(True)
    return rows


def _rows_for(label: str, entry, stage: str, device, dev: str, repeats: int, quick: bool) -> List[Row]:
    size, batch = int(entry["size"]), int(entry["batch"])
    shape = f"B={batch} {size}x{size}"
    common = [f"data.batch_size={batch}", f"data.img_size={size}", f"data.workers={os.cpu_count() or 2}",
              "data.rrc_scale=[0.2,1.0]" if stage == "pretrain" else "data.rrc_scale=[0.08,1.0]", "data.drop_last=true"]
    if stage == "finetune":
        common.append("data.auto_augment=rand-m9-mstd0.5-inc1")
    rows: List[Row] = []
    base: Optional[Row] = None
    for backend, directory, over in _variants(entry, device):
        if directory is None:
            why = "needs CUDA (nvJPEG 'mixed' decoding)" if backend == "dali-mixed" else "no raw conversion"
            rows.append(unavailable("data", label, backend, device, why, shape=shape))
            continue
        cfg = load_config(TrainConfig, None, [f"data.train={directory}"] + common + over)
        try:
            rates, cpu_per_img, n = measure(cfg, stage, device, repeats, pil_baseline=backend == BASELINE)
        except Exception as e:  # one failing backend is a row, not a lost table
            log.exception("bench data: %s %s failed", label, backend)
            rows.append(unavailable("data", label, backend, device, f"error: {type(e).__name__}: {e}", shape=shape))
            continue
        med = statistics.median(rates)
        extra = {"cpu_s_per_img": cpu_per_img, "images_per_epoch": n, "data": entry["note"]}
        if quick and backend.startswith("ffcv"):
            extra["numba_jit"] = "off (quick)"
        row = Row(part="data", name=label, backend=backend, device=dev, shape=shape, dtype="float32", unit="img/s",
                  median=med, spread=(max(rates) - min(rates)) / 2, repeats=repeats, extra=extra)
        if backend.startswith("torch-") and backend != BASELINE:
            ra = " + timm RandAugment (the shared device stage)" if stage == "finetune" else ""
            extra["path"] = (f"nvJPEG decode + crop{ra} on the GPU" if device.type == "cuda" else
                             f"decode + crop{ra} on CPU tensors")
        try:
            if backend == BASELINE:  # the reference does everything on the host
                host = cpu_per_img
            elif backend.startswith("torch-"):
                host = torch_host_seconds(cfg, stage, repeats)[0]
            else:
                host = measure(cfg, stage, device, repeats, hand_over_only=True)[1]
        except Exception as e:
            log.exception("bench data: %s %s host time failed", label, backend)
            host, extra["host_us_per_image"] = None, f"unavailable: error: {type(e).__name__}: {e}"
        attach_host_time(row, backend, stage, host, base)
        if backend == BASELINE:
            base = row
            row.baseline, row.ratio = BASELINE, 1.0
        elif base is not None:
            row.baseline, row.ratio = BASELINE, med / base.median
            extra["cpu_ratio_vs_baseline"] = base.extra["cpu_s_per_img"] / cpu_per_img
        rows.append(row)
        log.info("bench data: %s %-10s %8.1f img/s  %.2e cpu-s/img", label, backend, med, cpu_per_img)
    return rows


def run(quick: bool, device: torch.device) -> List[Row]:
    return [r for chunk in run_chunks(quick, device) for r in chunk]

"""``fastlivt bench data``'s split of the work at the hand-over: the host's CPU time per image up to it, per backend,
and the device stage every backend shares after it (:class:`~fastlivt.data.device_stage.DeviceStage`).

* Host time (``extra.host_us_per_image``): CPU microseconds per image a GPU machine's host spends before the batch
  goes to the device — the loader iterated with ``hand_over_only`` (ffcv: FFCV's pipeline copying each sample's
  stored bytes into pinned rows, the crop, flip and RandAugment draws and the queued copy of raw rows, its decode and
  crop running on the device; dali: its graph plus the RandAugment draws), or, for the torch backend, whose decode
  and crop run on the device, the reading of the bytes (its DataLoader items), the image size from the JPEG header
  and the crop, flip and RandAugment draws. The row's ``extra.host_does`` says which.
* Device stage (``device stage`` rows): milliseconds per batch of the shared device pipeline — crop + flip from the
  stored pixels, RandAugment per sample (BFT), normalisation, RandomErasing + Mixup/CutMix (BFT) — at 224 px, B = 32 and B = 256, with
  ``extra.device_ops_per_batch``: the aten operations one batch dispatches at each B (a TorchDispatchMode count on
  the benchmark's tensors; on a GPU, each one a kernel launch), equal for both when nothing loops over the images,
  and ``extra.device_bytes_per_image``: the bytes those operations read and write, per image.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastlivt.bench.common import Row, device_name, time_fn
from fastlivt.config import TrainConfig

BFT_POLICY = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def host_does(backend: str, stage: str) -> str:
    """What the host does up to the hand-over on ``backend`` (a bench label) in ``stage``."""
    draws = "crop/flip draws" + (" + RandAugment draws" if stage == "finetune" else "")
    return {
        "torch-pil": "everything (PIL decode, crop, flip, RandAugment, ToTensor, normalise: the reference)",
        "ffcv-jpg": f"read the stored JPEG bytes into pinned rows in FFCV, {draws} (decode, crop on the device, "
                    f"nvJPEG's host-side parsing with them)",
        "ffcv-raw": f"read the stored raw pixels into pinned rows in FFCV, {draws}, queue their copy (crop on the "
                    f"device)",
        "dali-cpu": f"read JPEG + DALI CPU decode + crop + flip, {draws}",
        "dali-mixed": f"read JPEG + DALI's host side of nvJPEG decode, {draws}",
    }.get(backend, f"read JPEG bytes + header size, {draws} (decode, crop on the device)")


def torch_host_seconds(cfg: TrainConfig, stage: str, repeats: int) -> Tuple[float, int]:
    """CPU seconds per image the torch backend's host spends on a GPU machine (bytes read as its DataLoader items,
    image size from the JPEG header, crop/flip and RandAugment draws), over ``repeats`` epochs; images per epoch."""
    from fastlivt.data import build_loader
    from fastlivt.data.shards import encoded_size
    from fastlivt.data.sample_rng import train_params

    with build_loader(cfg, "train", stage, device=torch.device("cpu")) as loader:
        dataset, augment = loader.dataset, loader.augment
        dataset.decode_here = False
        indices = loader.plan(0)
        positions = loader.positions(indices)
        b = loader.batch_size
        dataset.batches = [(indices[k:k + b], positions[k:k + b]) for k in range(0, indices.size, b)]
        t0 = time.process_time()
        for epoch in range(repeats):
            for k in range(len(dataset)):
                blob, sizes, _names, pos, _labels = dataset[k]
                hw = np.array([encoded_size(a.numpy()) for a in torch.split(blob, sizes.tolist())])
                train_params(cfg.run.seed, epoch, pos.numpy(), hw[:, 0], hw[:, 1], augment.rrc_scale)
                if augment.rand_augment is not None:
                    augment.rand_augment.draws(epoch, pos.numpy(), torch.device("cpu"))
        return (time.process_time() - t0) / (repeats * indices.size), int(indices.size)


class _Tally(TorchDispatchMode):
    """The aten operations dispatched while active and the bytes their tensor arguments and results hold (each
    operation reads its inputs and writes its outputs once: the device memory traffic, up to caching)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func.is_view or func.__name__.startswith("empty"):  # a view or an allocation moves no data
            return out
        for t in pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def tally(fn) -> Tuple[int, int]:
    """(aten operations, bytes moved) of ``fn()``."""
    with _Tally() as t:
        fn()
    return t.ops, t.bytes


def device_stage_rows(quick: bool, device: torch.device) -> List[Row]:
    """The device pipeline per batch at 224 px from the stored pixels (256-px images, as a raw .beton holds them):
    the shared crop + flip, then MGP (normalise) or BFT (RandAugment + normalise), B = 32 and 256. The operations and
    bytes are counted for the accelerators' way of cropping (batched products) on the benchmark's tensors."""
    from fastlivt.data import device_crop as dc
    from fastlivt.data import device_randaugment as dra
    from fastlivt.data.augment import BatchAugment
    from fastlivt.data.device_stage import DeviceStage
    from fastlivt.data.ra_fidelity import fidelity_images
    from fastlivt.data.sample_rng import train_params

    stored, size, batches = 256, 224, (32, 256)
    repeats = 1 if quick and device.type == "cpu" else 5  # a GPU's repeats take milliseconds
    base = torch.from_numpy(fidelity_images(32, stored)).permute(0, 3, 1, 2)
    rows: List[Row] = []
    for pipe, policy in (("MGP", None), ("BFT", dra.parse_policy(BFT_POLICY))):
        stage = DeviceStage(MEAN, STD, device, 0, policy)
        batch_augment = BatchAugment(1000, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, seed=0) if policy else None
        counts: Dict[int, Tuple[int, int]] = {}
        timed: Dict[int, Tuple[List[float], float]] = {}
        for b in batches:
            pixels = base.repeat((b + 31) // 32, 1, 1, 1)[:b].contiguous(memory_format=torch.channels_last).to(device)
            positions = np.arange(b)
            t0 = time.process_time()
            p = train_params(0, 0, positions, np.full(b, stored), np.full(b, stored), (0.08, 1.0))
            draws = stage.draws(0, positions, device)
            mixing = batch_augment.draws(0, positions, size, size) if batch_augment else None
            host_s = time.process_time() - t0
            labels = torch.arange(b, device=device) % 1000

            def run(method: str = "auto"):
                images = stage.apply(dc.crop_resize(pixels, p.windows, p.flip, size, method=method), draws)
                return batch_augment.apply(images, labels, mixing) if batch_augment else images

            times = time_fn(run, device, warmup=1, repeats=repeats)[2]
            counts[b] = tally(lambda: run("matmul"))
            timed[b] = (times, host_s)
        what = "crop + flip + " + ("RandAugment rand-m9-mstd0.5-inc1 per sample + normalise + RandomErasing 0.25 + "
                                   "Mixup 0.8 / CutMix 1.0" if policy else "normalise")
        ops = {f"B={b}": c[0] for b, c in counts.items()}
        for b, (times, host_s) in timed.items():
            med = statistics.median(times)
            rows.append(Row(part="data", name=f"device stage {pipe} {size} ({what})", backend="shared (all backends)",
                            device=device_name(device), shape=f"B={b} {stored}->{size}", dtype="uint8->float32",
                            unit="ms/batch", median=med, spread=(max(times) - min(times)) / 2, repeats=repeats,
                            extra={"device_ops_per_batch": ops, "device_bytes_per_image": counts[b][1] / b,
                                   "images_per_s": b / med * 1e3, "host_draw_us_per_image": host_s / b * 1e6,
                                   "crop": "batched products" if device.type != "cpu" else
                                   "per-sample uint8 kernel (the CPU's; counts are the batched products')",
                                   "where": "GPU" if device.type == "cuda" else "CPU tensors, the same code path"}))
    return rows


def attach_host_time(row: Row, backend: str, stage: str, host_s_per_img: Optional[float],
                     baseline: Optional[Row]) -> None:
    """Put the host figures into ``row.extra`` beside its full CPU path (``cpu_s_per_img``) and the PIL baseline's."""
    row.extra["host_does"] = host_does(backend, stage)
    if host_s_per_img is None:
        return
    row.extra["host_us_per_image"] = host_s_per_img * 1e6
    row.extra["full_cpu_us_per_image"] = row.extra["cpu_s_per_img"] * 1e6
    if baseline is not None:
        row.extra["host_ratio_vs_baseline_cpu"] = baseline.extra["cpu_s_per_img"] / host_s_per_img

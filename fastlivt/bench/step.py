"""``fastlivt bench step``: one full BFT training step, phase by phase, so a user sees where the time goes.

loader (next batch) -> batch augment (RandomErasing + Mixup/CutMix -> MixTarget) -> forward -> Bal-BCE -> backward ->
AdamW step. Each phase is a row (ms per step, its share of the step in ``extra``); the whole step is compared between
the loss backends measured in the same run (the fused Triton kernel where it can run, against the PyTorch path).

Model and data on CPU: the demo's (``configs/fmnist_lt/bft.yaml``: its ViT, image size, augmentations and batch),
the Fashion-MNIST-LT split converted into a temporary directory and read through ``build_loader``; on CUDA ViT-B/16
at 224 px. Where no converter/loader backend can run (e.g. a GPU server without FFCV and DALI) the loader phase is a
row ``unavailable: <reason>`` and the other phases run on synthetic batches of the same shape.

Then the whole step eager against torch.compile, with MFU: :func:`fastlivt.bench.compiled.bft_rows`.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from fastlivt.bench.common import DEMO_CONFIG, Row, demo_model_spec, device_name, sync, synthetic_batch
from fastlivt.logs import get_logger

log = get_logger(__name__)
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PHASES = ("loader", "augment", "forward", "loss", "backward", "optimizer")


def _demo_loader(tmp: Path, device: torch.device, batch: int):
    """Convert Fashion-MNIST-LT (ffcv raw) and return build_loader's train loader for the demo's BFT config."""
    from fastlivt.data_prep.config import ConvertConfig
    from fastlivt.data_prep.convert import convert
    from fastlivt.config import TrainConfig, load_config
    from fastlivt.data import build_loader

    ccfg = ConvertConfig(source="fmnist", root=str(FMNIST), split="train", imbalance_factor=100, formats=["ffcv", "dali"],
                         out=str(tmp / "train"), write_mode="raw", workers=0)
    # workers=0: decode in this process. Forking decode workers from a process whose loaders already run threads
    # (an earlier bench part) can deadlock on a lock copied mid-use.
    convert(ccfg, progress=False)
    cfg = load_config(TrainConfig, DEMO_CONFIG, [f"data.train={tmp / 'train'}", "data.val=", "data.backend=ffcv",
                                                 f"data.batch_size={batch}"])
    loader = build_loader(cfg, "train", "finetune", device=device)
    loader.batch_augment = None  # the batch augmentation is the next phase, timed on its own
    return loader


def _measure(step_fn: Callable[[], Dict[str, float]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    for _ in range(warmup):
        step_fn()
    times: Dict[str, List[float]] = {p: [] for p in PHASES}
    for _ in range(repeats):
        for k, v in step_fn().items():
            times[k].append(v)
    return times


def _step_fn(model, opt, loss_fn, augment, next_batch, device, autocast) -> Callable[[], Dict[str, float]]:
    done = [0]  # batches so far: the augmentation's draws are those of the batches of one long epoch

    def step() -> Dict[str, float]:
        out: Dict[str, float] = {}

        def mark(name: str, t0: float) -> float:
            sync(device)
            t1 = time.perf_counter()
            out[name] = (t1 - t0) * 1e3
            return t1

        t = time.perf_counter()
        images, labels = next_batch()
        t = mark("loader", t)
        b = images.shape[0]
        images, target = augment(images, labels, 0, np.arange(done[0] * b, (done[0] + 1) * b))
        done[0] += 1
        t = mark("augment", t)
        with autocast():
            logits = model(images)
        t = mark("forward", t)
        loss = loss_fn(logits.float() if device.type == "cpu" else logits, target)
        t = mark("loss", t)
        loss.backward()
        t = mark("backward", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer", t)
        return out

    return step


def _cycle(loader) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """next(loader), starting a new epoch when one ends."""
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])
    return next_batch


def run(quick: bool, device: torch.device) -> List[Row]:
    from fastlivt.data import BatchAugment
    from fastlivt.engine.optim import param_groups
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss
    from fastlivt.models.vit import build_vit

    dev = device_name(device)
    on_cuda = device.type == "cuda"
    if on_cuda:  # ViT-B/16 at 224 on ImageNet-LT-like classes
        spec = dict(arch="vit_base", img_size=224, patch_size=16)
        batch, classes = 128 if not quick else 64, 1000
    else:  # the demo's classifier, 10 classes
        spec = demo_model_spec()
        batch, classes = 64 if quick else 128, 10
    img = spec["img_size"]
    shape = f"{spec['arch']}/{spec['patch_size']} {img}px B={batch} C={classes}"
    rows: List[Row] = []
    tmp = tempfile.TemporaryDirectory(prefix="fastlivt-bench-step-")
    loader_reason: Optional[str] = None
    next_batch = None
    counts = [max(1, 1000 // (c + 1)) for c in range(classes)]
    if not on_cuda and FMNIST.is_dir():
        try:
            loader = _demo_loader(Path(tmp.name), device, batch)
            counts = loader.manifest.class_counts
            next_batch = _cycle(loader)
        except Exception as e:  # reported as a row, never silently replaced
            loader_reason = f"{type(e).__name__}: {e}"
    else:
        loader_reason = ("no converted data on this machine (the Fashion-MNIST package is absent)" if not on_cuda else
                         "GPU servers here have neither FFCV nor DALI; phases below use synthetic batches")
    if next_batch is None:
        fixed = synthetic_batch(device, batch, img, classes)
        next_batch = lambda: (fixed[0].clone(), fixed[1])  # noqa: E731

    augment = BatchAugment(classes, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, seed=0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else (lambda: torch.autocast("cpu", enabled=False))
    loss_backends = ["torch", "triton"] if on_cuda else ["torch"]
    totals: Dict[str, Tuple[float, float]] = {}
    for fused in loss_backends:
        torch.manual_seed(0)
        model = build_vit(num_classes=classes, drop_path=0.1, **spec).to(device)
        opt = torch.optim.AdamW(param_groups(model, 0.05, 0.75), lr=1e-3, betas=(0.9, 0.99))
        loss_fn = build_loss(LossConfig(name="bal_bce", fused=fused), counts)
        times = _measure(_step_fn(model, opt, loss_fn, augment, next_batch, device, autocast),
                         warmup=1 if quick else 3, repeats=3 if quick else 10)
        step_ms = [sum(times[p][i] for p in PHASES) for i in range(len(times["forward"]))]
        med = statistics.median(step_ms)
        totals[fused] = (med, (max(step_ms) - min(step_ms)) / 2)
        for p in PHASES:
            if p == "loader" and loader_reason:
                rows.append(Row(part="step", name="loader (next batch)", backend="-", device=dev, shape=shape,
                                unavailable=loader_reason))
                continue
            m = statistics.median(times[p])
            rows.append(Row(part="step", name=f"phase: {p}", backend=f"loss={fused}", device=dev, shape=shape,
                            dtype="bf16" if on_cuda else "fp32", unit="ms", median=m,
                            spread=(max(times[p]) - min(times[p])) / 2, repeats=len(times[p]),
                            extra={"share_of_step": m / med}))
        del model, opt
    base_ms = totals["torch"][0]
    for fused, (med, spread) in totals.items():
        rows.append(Row(part="step", name="whole BFT step", backend=f"loss={fused}", device=dev, shape=shape,
                        dtype="bf16" if on_cuda else "fp32", unit="ms", median=med, spread=spread,
                        repeats=3 if quick else 10, baseline="loss=torch", ratio=base_ms / med,
                        extra={"img_per_s": batch / med * 1e3}))
    if not on_cuda:
        rows.append(Row(part="step", name="whole BFT step", backend="loss=triton", device=dev, shape=shape,
                        unavailable="needs CUDA (the Triton interpreter on CPU is a correctness tool, not a speed one)"))
    tmp.cleanup()
    from fastlivt.bench.compiled import bft_rows

    return rows + bft_rows(quick, device)

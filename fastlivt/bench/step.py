"""``fastlivt bench step``: one full BFT training step, phase by phase, so a user sees where the time goes.

loader (next batch) -> batch augment (RandomErasing + Mixup/CutMix -> MixTarget) -> forward -> Bal-BCE -> backward ->
AdamW step. Each phase is a row (ms per step, its share of the step in ``extra``); the whole step is compared between
the loss backends measured in the same run (the fused Triton kernel where it can run, against the PyTorch path).

Data: on CPU the Fashion-MNIST-LT demo split (converted into a temporary directory, 32 px, ViT-T/4) read through
``build_loader``; where no converter/loader backend can run (e.g. a GPU server without FFCV and DALI) the loader phase
is a row ``unavailable: <reason>`` and the other phases run on synthetic batches of the same shape.

Then the whole step eager against torch.compile, with MFU: :func:`fastlivt.bench.compiled.bft_rows`.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastlivt.bench.common import Row, device_name, sync, synthetic_batch
from fastlivt.logs import get_logger

log = get_logger(__name__)
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PHASES = ("loader", "augment", "forward", "loss", "backward", "optimizer")


def _demo_loader(tmp: Path, device: torch.device, batch: int, quick: bool):
    """Convert a small Fashion-MNIST-LT (ffcv raw) and return (build_loader's train loader, backend name)."""
    from data_prep.config import ConvertConfig
    from data_prep.convert import convert
    from fastlivt.config import TrainConfig, load_config
    from fastlivt.data import build_loader

    ccfg = ConvertConfig(source="fmnist", root=str(FMNIST), split="train", imbalance_factor=100, formats=["ffcv", "dali"],
                         out=str(tmp / "train"), write_mode="raw", workers=0)
    # workers=0: decode in this process. Forking decode workers from a process whose loaders already run threads
    # (an earlier bench part) can deadlock on a lock copied mid-use.
    convert(ccfg, progress=False)
    cfg = load_config(TrainConfig, None, [f"data.train={tmp / 'train'}", "data.backend=ffcv", "data.img_size=32",
                                          f"data.batch_size={batch}", "data.workers=2", "data.auto_augment=rand-m9-mstd0.5-inc1",
                                          "data.mean=[0.286,0.286,0.286]", "data.std=[0.353,0.353,0.353]"])
    return build_loader(cfg, "train", "finetune", device=device), "ffcv"


def _measure(step_fn: Callable[[], Dict[str, float]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    for _ in range(warmup):
        step_fn()
    times: Dict[str, List[float]] = {p: [] for p in PHASES}
    for _ in range(repeats):
        for k, v in step_fn().items():
            times[k].append(v)
    return times


def _step_fn(model, opt, loss_fn, augment, next_batch, device, autocast) -> Callable[[], Dict[str, float]]:
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
        images, target = augment(images, labels)
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


def run(quick: bool, device: torch.device) -> List[Row]:
    from fastlivt.data import BatchAugment
    from fastlivt.engine.optim import param_groups
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss
    from fastlivt.models.vit import build_vit

    dev = device_name(device)
    on_cuda = device.type == "cuda"
    if on_cuda:  # ViT-B/16 at 224 on ImageNet-LT-like classes
        arch, img, patch, batch, classes = "vit_base", 224, 16, 128 if not quick else 64, 1000
    else:  # the demo's ViT-T/4 at 32 px, 10 classes
        arch, img, patch, batch, classes = "vit_tiny", 32, 4, 64 if quick else 128, 10
    shape = f"{arch}/{patch} {img}px B={batch} C={classes}"
    rows: List[Row] = []
    tmp = tempfile.TemporaryDirectory(prefix="fastlivt-bench-step-")
    loader_reason: Optional[str] = None
    next_batch = None
    counts = [max(1, 1000 // (c + 1)) for c in range(classes)]
    if not on_cuda and FMNIST.is_dir():
        try:
            loader, backend = _demo_loader(Path(tmp.name), device, batch, quick)
            counts = loader.manifest.class_counts
            state = {"it": iter(loader)}

            def next_batch():
                try:
                    return next(state["it"])
                except StopIteration:
                    state["it"] = iter(loader)
                    return next(state["it"])
        except Exception as e:  # reported as a row, never silently replaced
            loader_reason = f"{type(e).__name__}: {e}"
    else:
        loader_reason = ("no converted data on this machine (the Fashion-MNIST package is absent)" if not on_cuda else
                         "GPU servers here have neither FFCV nor DALI; phases below use synthetic batches")
    if next_batch is None:
        fixed = synthetic_batch(device, batch, img, classes)

        def next_batch():
            return fixed[0].clone(), fixed[1]

    augment = BatchAugment(classes, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else (lambda: torch.autocast("cpu", enabled=False))
    loss_backends = ["torch", "triton"] if on_cuda else ["torch"]
    totals: Dict[str, Tuple[float, float]] = {}
    for fused in loss_backends:
        torch.manual_seed(0)
        model = build_vit(arch, img_size=img, patch_size=patch, num_classes=classes, drop_path=0.1).to(device)
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

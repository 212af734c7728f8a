"""``fastlivt bench deepspeed``: one BFT step of ViT-L/16 at 384 px, bf16, ZeRO-3, with and without activation checkpointing.

The question (paper Tables 2-3, rows marked *) is whether ViT-L/384 fits a GPU at micro-batch 32: the peak memory of a
full step (forward, Balanced-BCE loss, backward, AdamW over the layer-decay groups) with timm's
``set_grad_checkpointing`` (target < 40 GB) and its images/s, against the same step without checkpointing, in the same
run. It runs as a single-process DeepSpeed world of 1 (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set here if absent).
On CPU the rows say ``unavailable: needs CUDA``.
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import torch

from fastlivt.bench.common import Row, device_name, unavailable
from fastlivt.logs import get_logger

log = get_logger(__name__)

PART = "deepspeed"
ZERO3_JSON = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
ARCH, IMG, PATCH, CLASSES, MICRO = "vit_large", 384, 16, 1000, 32
TARGET_GB = 40.0


def _name(ckpt: bool, zero3: bool = True) -> str:
    how = "ZeRO-3" if zero3 else "plain PyTorch"
    return f"BFT step ViT-L/16@{IMG} {how} bf16 " + ("+ activation checkpointing" if ckpt else "(no checkpointing)")


def _loss_fn(device: torch.device) -> Tuple[Any, str]:
    """Balanced BCE from :mod:`fastlivt.losses` over a long-tailed prior (Zipf counts, 1,280 -> 5 images per class)."""
    counts = torch.round(1280.0 * torch.arange(1, CLASSES + 1, dtype=torch.float64) ** -0.8).clamp(min=5)
    try:
        from fastlivt.config import LossConfig
        from fastlivt.losses import build_loss
    except ImportError as e:  # visible in the row, never silent
        log.warning("fastlivt.losses not importable (%s): the step uses plain BCE-with-logits", e)
        return (lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), torch.nn.functional.one_hot(y, CLASSES).float())), f"bce_with_logits (fastlivt.losses: {e})"
    return build_loss(LossConfig(name="bal_bce"), counts.long().tolist()).to(device), "bal_bce (fastlivt.losses)"


def _measure(ckpt: bool, zero3: bool, quick: bool, device: torch.device) -> Dict[str, Any]:
    """Median step time, images/s, peak memory and the forward / backward / optimizer split of one configuration."""
    from timm.optim import param_groups_layer_decay

    from fastlivt.config import TrainConfig
    from fastlivt.engine.ds_runtime import DeepSpeedRuntime
    from fastlivt.engine.torch_runtime import TorchRuntime
    from fastlivt.models.vit import build_vit

    cfg = TrainConfig()
    cfg.deepspeed = str(ZERO3_JSON) if ZERO3_JSON.is_file() else {"zero_optimization": {"stage": 3}}
    cfg.data.batch_size, cfg.optim.accum_iter, cfg.optim.clip_grad = MICRO, 1, None
    cfg.run.device, cfg.run.amp = "cuda", "bf16"
    cfg.model.grad_checkpointing = ckpt
    cfg.run.compile = "off"  # ZeRO-3 cannot compile; the plain-PyTorch rows stay comparable (compiled: bench compiled)
    if not zero3:
        cfg.deepspeed = None
    rt = DeepSpeedRuntime(cfg) if zero3 else TorchRuntime(cfg)
    torch.manual_seed(0)
    model = build_vit(ARCH, img_size=IMG, patch_size=PATCH, num_classes=CLASSES, drop_path=0.2)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65)
    engine = rt.prepare(model, groups, lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05)
    loss_fn, loss_name = _loss_fn(device)
    images = torch.randn(MICRO, 3, IMG, IMG, device=device)
    labels = torch.randint(0, CLASSES, (MICRO,), device=device)

    def step(split: List[List[float]]) -> None:
        t0 = time.perf_counter()
        with rt.autocast():
            loss = loss_fn(engine(images), labels)
        torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        rt.backward(loss)
        torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        rt.step()
        torch.cuda.synchronize(device)
        split.append([t1 - t0, t2 - t1, time.perf_counter() - t2])

    warmup, repeats = (1, 3) if quick else (3, 10)
    for _ in range(warmup):
        step([])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    split: List[List[float]] = []
    for _ in range(repeats):
        step(split)
    times = [sum(s) for s in split]
    phases = {f"{k}_ms": round(statistics.median(s[i] for s in split) * 1e3, 1)
              for i, k in enumerate(("fwd", "bwd", "opt"))}
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    reserved = torch.cuda.max_memory_reserved(device) / 1e9
    ms = statistics.median(times) * 1e3
    ips = [MICRO / t for t in times]
    if zero3:
        engine.destroy()
    del engine, model, groups, rt
    gc.collect()
    torch.cuda.empty_cache()
    return {"ms": ms, "ips": statistics.median(ips), "ips_spread": (max(ips) - min(ips)) / 2, "peak_gb": peak,
            "reserved_gb": reserved, "repeats": repeats, "loss": loss_name, "phases": phases}


def run_chunks(quick: bool, device: torch.device) -> Iterator[List[Row]]:
    """One row per configuration, each written by ``fastlivt bench`` as soon as it is measured (the last part of a
    short GPU window); a row's baseline is always measured before it."""
    shape = f"B={MICRO} L={(IMG // PATCH) ** 2 + 1} D=1024 depth=24 C={CLASSES}"
    if device.type != "cuda":
        yield [unavailable(PART, _name(c, z), "deepspeed-zero3" if z else "torch", device, "needs CUDA", shape=shape,
                           dtype="bf16") for z in (True, False) for c in (False, True)]
        return
    # ZeRO-3 with checkpointing is compared with ZeRO-3 without; the plain-PyTorch rows (same step, torch AdamW, no
    # DeepSpeed) show what ZeRO-3 itself costs in a world of one, and are compared with ZeRO-3 at the same setting.
    try:
        import deepspeed  # noqa: F401
        missing = None
    except Exception as e:  # e.g. a GPU server without DeepSpeed: the plain-PyTorch rows still run
        missing = f"DeepSpeed does not import ({type(e).__name__}: {e})"
    if missing:
        yield [unavailable(PART, _name(c, True), "deepspeed-zero3", device, missing, shape=shape, dtype="bf16")
               for c in (False, True)]
    results: Dict[Tuple[bool, bool], Dict[str, Any]] = {}
    for zero3, ckpt in [(z, c) for z in ((False,) if missing else (True, False)) for c in (False, True)]:
        r = results[(zero3, ckpt)] = _measure(ckpt, zero3, quick, device)
        base_key = (True, False) if zero3 and ckpt else ((True, ckpt) if not zero3 else None)
        base = results.get(base_key) if base_key else None
        yield [Row(part=PART, name=_name(ckpt, zero3), backend="deepspeed-zero3" if zero3 else "torch",
                   device=device_name(device), shape=shape, dtype="bf16", unit="img/s", median=r["ips"],
                   spread=r["ips_spread"], repeats=r["repeats"],
                   baseline=_name(base_key[1], base_key[0]) if base else "",
                   ratio=r["ips"] / base["ips"] if base else None,
                   extra={"peak_mem_gb": round(r["peak_gb"], 2), "reserved_gb": round(r["reserved_gb"], 2),
                          "step_ms": round(r["ms"], 1), **r["phases"], "target_peak_gb": TARGET_GB,
                          "meets_target": r["peak_gb"] < TARGET_GB, "loss": r["loss"]})]


def run(quick: bool, device: torch.device) -> List[Row]:
    return [r for chunk in run_chunks(quick, device) for r in chunk]

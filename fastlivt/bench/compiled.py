"""Eager against ``torch.compile`` (``run.compile``'s per-block regions) for whole training steps, with MFU.

:func:`mgp_rows` (part ``model``): the visible-only MGP step — encoder, decoder, masked MSE, fused AdamW — ViT-B/16 at
batch 256 in bf16 on CUDA (ViT-S, batch 8, fp32 on CPU). :func:`bft_rows` (part ``step``): the BFT step — Mixup/CutMix,
forward, Bal-BCE, backward, fused AdamW — ViT-B/16 224, 1000 classes, batch 256, bf16 on CUDA; on CPU the demo's model
(``configs/fmnist_lt/bft.yaml``: 96 wide, 6 blocks, 7-px patches at 28 px, 10 classes, batch 128, fp32).

Both variants are built from the same seed, compiled outside the timing, then timed alternately (A B A B ...). Each
row: images/s, ``extra.mfu`` = model FLOPs per image (:mod:`fastlivt.models.cost`) x images/s / the GEMM peak measured
in this run on this device and dtype; compiled rows add ``extra.graph_breaks`` (dynamo's count while compiling and
running the first step), CUDA rows ``extra.peak_mem_gb``.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np
import torch

from fastlivt.bench.common import (DECODER, IMG, MASK, PATCH, Row, autocast, demo_model_spec, device_name, measure_pair,
                                   mfu_extra, peak_row, synthetic_batch, unavailable)
from fastlivt.models.compile import CompileChoice, compile_criterion, compile_model, graph_breaks
from fastlivt.models.cost import bft_cost, gemm_peak_flops, mgp_cost
from fastlivt.models.mae import MaskedAutoencoderViT
from fastlivt.models.vit import arch_spec


def mgp_rows(arch: str, quick: bool, device: torch.device) -> List[Row]:
    """The visible-only MGP step, eager vs per-block torch.compile, images/s with MFU (and peak memory on CUDA)."""
    cuda = device.type == "cuda"
    batch = 256 if cuda else 8
    warmup, repeats = (1, 3) if quick else (3, 10 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    name = f"MGP step visible-only, eager vs torch.compile, {arch}/{PATCH} {IMG}"
    fns, breaks = {}, {}
    imgs = torch.randn(batch, 3, IMG, IMG, device=device)
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(img_size=IMG, patch_size=PATCH, norm_pix_loss=True, attention="auto",
                                     **arch_spec(arch), **DECODER).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        if compiled:
            compile_model(model, CompileChoice(True, None, "bench model"))

        def fn(model=model, opt=opt) -> None:
            with autocast(device):
                loss, _, _ = model(imgs, MASK)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        before = graph_breaks()
        fn()  # compiles outside the timing
        breaks[compiled] = graph_breaks() - before
        fns[compiled] = fn
    times = measure_pair(fns, device, warmup, repeats)
    peak = gemm_peak_flops(device, dtype)
    flops = mgp_cost(arch, mask_ratio=MASK).train_flops
    eager = times[False]
    rows = []
    for compiled in (False, True):
        backend = "torch.compile (per block)" if compiled else "eager"
        t = times[compiled]
        if t is None:
            rows.append(unavailable("model", name, backend, device, f"out of memory at batch {batch}", shape=f"B={batch}"))
            continue
        ips = batch / (t["median"] * 1e-3)
        extra = {**mfu_extra(ips, flops, peak), "step_ms": round(t["median"], 3)}
        if compiled:
            extra["graph_breaks"] = breaks[True]
        if "peak_mem_gb" in t:
            extra["peak_mem_gb"] = round(t["peak_mem_gb"], 2)
        rows.append(Row(part="model", name=name, backend=backend, device=device_name(device), shape=f"B={batch}",
                        dtype="bf16" if cuda else "fp32", unit="img/s", median=ips,
                        spread=ips * t["spread"] / t["median"] if t["spread"] else None, repeats=repeats,
                        baseline="eager", ratio=eager["median"] / t["median"] if eager else None,
                        extra=extra))
    del fns
    return rows


def bft_rows(quick: bool, device: torch.device) -> List[Row]:
    """The whole BFT step eager vs compiled, images/s with MFU (see the module docstring)."""
    from fastlivt.data import BatchAugment
    from fastlivt.engine.optim import build_adamw, param_groups
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss
    from fastlivt.models.vit import build_vit

    cuda = device.type == "cuda"
    if cuda:
        spec = dict(arch="vit_base", img_size=224, patch_size=16, embed_dim=0, depth=0, num_heads=0)
        classes, batch, dtype = 1000, 128 if quick else 256, torch.bfloat16
    else:
        spec = demo_model_spec()
        classes, batch, dtype = 10, 64 if quick else 128, torch.float32
    cost = bft_cost(num_classes=classes, **spec)
    name = f"whole BFT step (Mixup/CutMix, fwd, Bal-BCE, bwd, AdamW) {spec['arch']}/{spec['patch_size']} {spec['img_size']}"
    shape = f"B={batch} C={classes} D={spec['embed_dim'] or 768} depth={spec['depth'] or 12}"
    dname = "bf16" if cuda else "fp32"
    counts = [max(1, 1000 // (c + 1)) for c in range(classes)]
    images, labels = synthetic_batch(device, batch, spec["img_size"], classes)
    augment = BatchAugment(classes, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, seed=0)
    positions = np.arange(batch)  # one batch's draws, the same at every step: eager and compiled do equal work
    fns, breaks = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_vit(num_classes=classes, drop_path=0.1, **spec).to(device).train()
        opt = build_adamw(param_groups(model, 0.05, 0.75), 1e-3, (0.9, 0.99), 0.05, device)
        loss_fn = build_loss(LossConfig(name="bal_bce"), counts).to(device)
        if compiled:
            choice = CompileChoice(True, None, "bench step")
            compile_model(model, choice)
            loss_fn = compile_criterion(loss_fn, choice)

        def step(model=model, opt=opt, loss_fn=loss_fn) -> None:
            x, target = augment(images.clone(), labels, 0, positions)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        before = graph_breaks()
        step()  # the compiled variant compiles here, outside the timing
        breaks[compiled] = graph_breaks() - before
        fns[compiled] = step
    warmup, repeats = (1, 3) if quick else (3, 10)
    times = measure_pair(fns, device, warmup, repeats)
    peak = gemm_peak_flops(device, dtype)
    rows = [peak_row("step", device, dtype)]
    eager_ips = batch / (times[False]["median"] * 1e-3) if times[False] else None
    for compiled in (False, True):
        backend = "torch.compile (per block)" if compiled else "eager"
        t = times[compiled]
        if t is None:
            rows.append(Row(part="step", name=name, backend=backend, device=device_name(device), shape=shape,
                            dtype=dname, unavailable=f"out of memory at batch {batch}"))
            continue
        ips = batch / (t["median"] * 1e-3)
        extra = {**mfu_extra(ips, cost.train_flops, peak), "step_ms": round(t["median"], 3)}
        if compiled:
            extra["graph_breaks"] = breaks[True]
        if "peak_mem_gb" in t:
            extra["peak_mem_gb"] = round(t["peak_mem_gb"], 2)
        spread = ips * t["spread"] / t["median"] if t["spread"] else None
        rows.append(Row(part="step", name=name, backend=backend, device=device_name(device), shape=shape, dtype=dname,
                        unit="img/s", median=ips, spread=spread, repeats=repeats, baseline="eager",
                        ratio=ips / eager_ips if eager_ips else None, extra=extra))
    return rows


def run_chunks(quick: bool, device: torch.device) -> Iterator[List[Row]]:
    """``fastlivt bench compiled``: the GEMM peak, then the MGP rows, then the BFT rows — each group written as soon
    as it is measured (a GPU window that closes during the BFT compile keeps the MGP figures)."""
    cuda = device.type == "cuda"
    yield _tagged([peak_row("compiled", device, torch.bfloat16 if cuda else torch.float32)])
    yield _tagged(mgp_rows("vit_base" if cuda else "vit_small", quick, device))
    yield _tagged([r for r in bft_rows(quick, device) if r.name != "GEMM peak (MFU denominator)"])


def run(quick: bool, device: torch.device) -> List[Row]:
    return [r for chunk in run_chunks(quick, device) for r in chunk]


def _tagged(rows: List[Row]) -> List[Row]:
    for r in rows:
        r.part = "compiled"
    return rows

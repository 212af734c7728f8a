"""``fastlivt bench model``: what running the MGP encoder on the visible tokens only buys, per attention backend.

1. Encoder forward+backward at mask 0.75, visible tokens only (1 + 49 at 224 px) against the *same* encoder (same
   weights) on all 1 + 196 tokens. MAE reports "3× or more".
2. The full MGP step — encoder, 8-block 512-wide decoder (always on all tokens), masked MSE, AdamW step — visible-only
   against the same step with the encoder on all tokens, for ViT-S/B/L at 224. Token arithmetic (``predicted_ratio``,
   from the matmul FLOPs of encoder and decoder) says about 1.5×, 2.4× and 3.3×: the decoder's share caps the gain of
   small encoders. Full mode adds where the time goes (encoder, decoder + loss, AdamW, each timed alone).

On CUDA: ViT-B/16 for part 1 and batch 256 (128 for ViT-L) in bf16 autocast for part 2, with images/s and the peak
memory (``torch.cuda.max_memory_allocated``) per backend; on CPU: ViT-S for part 1 and small batches, backend ``sdpa``
for part 2 (``math`` as well in full mode).

3. The visible-only MGP step eager against ``torch.compile`` (``run.compile``'s per-block regions), ViT-B/16 at
   batch 256 on CUDA (ViT-S, batch 8, fp32 on CPU; full mode only there — compiling takes minutes on 2 cores).

Every MGP step row carries its MFU: model FLOPs per image (:func:`fastlivt.models.cost.mgp_cost`, visible-only
encoder + decoder, x3 for forward + backward) x images/s over the GEMM peak measured in this run on this device and
dtype (``extra.mfu``, a fraction); compiled rows add ``extra.graph_breaks``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch

from fastlivt.bench.common import (DECODER, IMG, MASK, PATCH, Row, autocast, device_name, measure_pair, mfu_extra,
                                   peak_row, time_fn, unavailable)
from fastlivt.logs import get_logger
from fastlivt.models.attention import AttentionBackendError, resolve_backend, set_attention_backend
from fastlivt.models.cost import gemm_peak_flops, mgp_cost
from fastlivt.models.mae import MaskedAutoencoderViT
from fastlivt.models.vit import arch_spec

log = get_logger(__name__)


def transformer_flops(tokens: int, dim: int, depth: int) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks (mlp 4×) on ``tokens`` tokens: 24·N·D² + 4·N²·D per block."""
    return depth * (24 * tokens * dim * dim + 4 * tokens * tokens * dim)


def predicted_ratio(arch: str, decoder_dim: int = 512, decoder_depth: int = 8) -> float:
    """(encoder on all tokens + decoder) / (encoder on visible tokens + decoder), by FLOPs; AdamW not counted."""
    spec = arch_spec(arch)
    length = (IMG // PATCH) ** 2
    keep = int(length * (1 - MASK))
    dec = transformer_flops(length + 1, decoder_dim, decoder_depth)
    enc = lambda n: transformer_flops(n, spec["embed_dim"], spec["depth"])  # noqa: E731
    return (enc(length + 1) + dec) / (enc(keep + 1) + dec)


_built: Dict[str, MaskedAutoencoderViT] = {}


def build(arch: str, device: torch.device) -> MaskedAutoencoderViT:
    """The MAE of ``arch`` at 224/16 with the default decoder; the last one built is reused (one in memory)."""
    if arch not in _built:
        _built.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        _built[arch] = MaskedAutoencoderViT(img_size=IMG, patch_size=PATCH, **arch_spec(arch), **DECODER).to(device)
    return _built[arch]


def usable_backends(device: torch.device, wanted: List[str], name: str, shape: str, rows: List[Row]) -> List[str]:
    ok = []
    for backend in wanted:
        try:
            resolve_backend(backend, device)
            ok.append(backend)
        except AttentionBackendError as e:
            rows.append(unavailable("model", name, backend, device, str(e), shape=shape))
    return ok


def encoder_rows(quick: bool, device: torch.device) -> List[Row]:
    cuda = device.type == "cuda"
    arch = "vit_base" if cuda else "vit_small"
    batch = 256 if cuda else (4 if quick else 16)
    warmup, repeats = (1, 2) if quick else (2, 5)
    dtype = "bf16" if cuda else "fp32"
    name = f"encoder fwd+bwd visible-only (mask {MASK}) vs all tokens, {arch}/{PATCH} {IMG}"
    shape = f"B={batch} L=196 keep={int(196 * (1 - MASK))}"
    rows: List[Row] = []
    backends = usable_backends(device, ["sdpa", "math", "xformers"], name, shape, rows)
    model = build(arch, device).train()
    imgs = torch.randn(batch, 3, IMG, IMG, device=device)
    for backend in backends:
        set_attention_backend(model, backend)

        def step(visible_only: bool) -> Callable[[], None]:
            def fn():
                with autocast(device):
                    latent, _, _ = model.forward_encoder(imgs, MASK, visible_only=visible_only)
                latent.float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            return fn

        times = measure_pair({True: step(True), False: step(False)}, device, warmup, repeats)
        if times[True] is None or times[False] is None:
            rows.append(unavailable("model", name, backend, device, f"out of memory at batch {batch}", shape=shape))
            continue
        vis, full = times[True], times[False]
        extra = {"all_tokens_ms": full["median"], "img_per_s": batch / (vis["median"] * 1e-3)}
        if cuda:
            extra.update(peak_mem_gb=vis["peak_mem_gb"], all_tokens_peak_mem_gb=full["peak_mem_gb"])
        rows.append(Row(part="model", name=name, backend=backend, device=device_name(device), shape=shape, dtype=dtype,
                        unit="ms", median=vis["median"], spread=vis["spread"], repeats=repeats,
                        baseline="same encoder on all tokens", ratio=full["median"] / vis["median"], extra=extra))
    return rows


def mgp_step_rows(arch: str, quick: bool, device: torch.device, backends: List[str]) -> List[Row]:
    cuda = device.type == "cuda"
    batch = (128 if arch == "vit_large" else 256) if cuda else (2 if quick else (4 if arch == "vit_large" else 8))
    warmup, repeats = (1, 1) if quick else (2, 5 if cuda else 3)
    dtype = "bf16" if cuda else "fp32"
    name = f"MGP step (encoder + decoder 8x512 + loss + AdamW) visible-only vs all tokens, {arch}/{PATCH} {IMG}"
    shape = f"B={batch}"
    rows: List[Row] = []
    backends = usable_backends(device, backends, name, shape, rows)
    model = build(arch, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=cuda or None)
    imgs = torch.randn(batch, 3, IMG, IMG, device=device)
    for backend in backends:
        set_attention_backend(model, backend)

        def step(visible_only: bool) -> Callable[[], None]:
            def fn():
                with autocast(device):
                    loss, _, _ = model(imgs, MASK, visible_only=visible_only)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fn

        times = measure_pair({True: step(True), False: step(False)}, device, warmup, repeats)
        opt.zero_grad(set_to_none=True)
        vis, full = times[True], times[False]
        if vis is None:
            rows.append(unavailable("model", name, backend, device, f"out of memory at batch {batch}", shape=shape))
            continue
        extra = {"predicted_ratio": predicted_ratio(arch), "img_per_s": batch / (vis["median"] * 1e-3)}
        extra.update(mfu_extra(extra["img_per_s"], mgp_cost(arch, mask_ratio=MASK).train_flops,
                               gemm_peak_flops(device, torch.bfloat16 if cuda else torch.float32)))
        if full is not None:
            extra["all_tokens_ms"] = full["median"]
            extra["all_tokens_img_per_s"] = batch / (full["median"] * 1e-3)
        if cuda:
            extra["peak_mem_gb"] = vis["peak_mem_gb"]
            if full is not None:
                extra["all_tokens_peak_mem_gb"] = full["peak_mem_gb"]
        if not quick:
            try:
                extra.update(breakdown(model, opt, imgs, device, warmup, repeats))
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                extra["breakdown"] = "out of memory"
        rows.append(Row(part="model", name=name, backend=backend, device=device_name(device), shape=shape, dtype=dtype,
                        unit="ms", median=vis["median"], spread=vis["spread"], repeats=repeats,
                        baseline="same step, encoder on all tokens", ratio=(full["median"] / vis["median"])
                        if full else None, extra=extra if full else {**extra, "all_tokens": "out of memory"}))
    del opt
    return rows


def breakdown(model: MaskedAutoencoderViT, opt: torch.optim.Optimizer, imgs: torch.Tensor, device: torch.device,
              warmup: int, repeats: int) -> Dict[str, float]:
    """Where one visible-only step spends its time: encoder fwd+bwd, decoder+loss fwd+bwd, AdamW step (ms each)."""
    out: Dict[str, float] = {}
    with torch.no_grad(), autocast(device):
        latent_vis, mask, ids_restore = model.forward_encoder(imgs, MASK)

    def encoder(visible_only: bool) -> Callable[[], None]:
        def fn():
            with autocast(device):
                latent, _, _ = model.forward_encoder(imgs, MASK, visible_only=visible_only)
            latent.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    def decoder():
        with autocast(device):
            pred = model.forward_decoder(latent_vis.detach(), ids_restore)
            loss = model.forward_loss(imgs, pred, mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    out["encoder_visible_ms"] = time_fn(encoder(True), device, warmup, repeats)[0]
    out["encoder_all_ms"] = time_fn(encoder(False), device, warmup, repeats)[0]
    out["decoder_loss_ms"] = time_fn(decoder, device, warmup, repeats)[0]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    out["adamw_ms"] = time_fn(opt.step, device, warmup, repeats)[0]
    opt.zero_grad(set_to_none=True)
    return out


def run(quick: bool, device: torch.device) -> List[Row]:
    t0 = time.perf_counter()
    rows = encoder_rows(quick, device)
    log.info("bench model: encoder visible-only vs all tokens done (%.1f s)", time.perf_counter() - t0)
    cuda = device.type == "cuda"
    archs = ["vit_small", "vit_base"] if quick else ["vit_small", "vit_base", "vit_large"]
    if quick:
        log.info("bench model (quick): ViT-L MGP step skipped; run without --quick for it")
    backends = ["xformers", "sdpa", "math"] if cuda else (["sdpa"] if quick else ["sdpa", "math"])
    for arch in archs:
        t0 = time.perf_counter()
        rows += mgp_step_rows(arch, quick, device, backends)
        log.info("bench model: MGP step %s done (%.1f s)", arch, time.perf_counter() - t0)
    _built.clear()
    if cuda:
        rows += throughput_rows(rows)
    rows.insert(0, peak_row("model", device, torch.bfloat16 if cuda else torch.float32))
    if cuda or not quick:
        from fastlivt.bench.compiled import mgp_rows

        rows += mgp_rows("vit_base" if cuda else "vit_small", quick, device)
    else:
        log.info("bench model (quick, CPU): compiled MGP step skipped; `fastlivt bench step` has the compiled demo step")
    return rows


def throughput_rows(rows: List[Row]) -> List[Row]:
    """ViT-B/16 224 MGP images/s per backend, as rows of their own with ``math`` as the baseline."""
    picked = [r for r in rows if r.name.startswith("MGP step") and "vit_base" in r.name and r.median]
    base = next((r.extra["img_per_s"] for r in picked if r.backend == "math"), None)
    out = []
    for r in picked:
        ips = r.extra["img_per_s"]
        out.append(Row(part="model", name="MGP step images/s, vit_base/16 224, visible-only", backend=r.backend,
                       device=r.device, shape=r.shape, dtype=r.dtype, unit="img/s", median=ips,
                       spread=ips * r.spread / r.median if r.spread else None, repeats=r.repeats, baseline="math",
                       ratio=ips / base if base else None, extra={"peak_mem_gb": r.extra.get("peak_mem_gb")}))
    return out

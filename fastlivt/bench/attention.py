"""``fastlivt bench attention``: ``attend()`` per backend (math | sdpa | xformers) at ViT-B/16-224 shapes.

Shapes: 12 heads of 64, L = 197 (all tokens, as in fine-tuning) and L = 50 (the 25 % visible tokens + class token of
MGP). Forward+backward, and forward alone at L = 197 (evaluation). Baseline: the explicit ``math`` backend of the
same run. On CUDA: batch 256 in bf16, with the peak memory of one call; on CPU: fp32, small batches.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from fastlivt.bench.common import Row, device_name, time_fn, unavailable
from fastlivt.models.attention import AttentionBackendError, attend, attention_flops, resolve_backend

HEADS, HEAD_DIM = 12, 64
BACKENDS = ("math", "sdpa", "xformers")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def peak_memory_gb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated before it (GB)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e9


def run(quick: bool, device: torch.device) -> List[Row]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 256 if cuda else (8 if quick else 32)
    warmup, repeats = (1, 3) if quick else (3, 10 if cuda else 5)
    rows: List[Row] = []
    cases = [("fwd+bwd", 197), ("fwd+bwd", 50), ("fwd", 197)]
    for mode, length in cases:
        name = f"attend {mode}, {'all tokens' if length == 197 else '25% visible'}"
        shape = f"B={batch} H={HEADS} L={length} d={HEAD_DIM}"
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, device=device, dtype=dtype, generator=gen,
                               requires_grad=mode == "fwd+bwd") for _ in range(3))
        grad = torch.randn(batch, HEADS, length, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        flops = attention_flops(batch, HEADS, length, HEAD_DIM) * (3 if mode == "fwd+bwd" else 1)
        baseline_ms = None
        for backend in BACKENDS:
            try:
                resolve_backend(backend, device)
            except AttentionBackendError as e:
                rows.append(unavailable("attention", name, backend, device, str(e), shape=shape,
                                        dtype=DTYPE_NAMES[dtype]))
                continue

            def call(backend=backend):
                if mode == "fwd+bwd":
                    attend(q, k, v, backend=backend).backward(grad)
                    for t in (q, k, v):
                        t.grad = None
                else:
                    with torch.no_grad():
                        attend(q, k, v, backend=backend)

            try:
                median, spread, _ = time_fn(call, device, warmup=warmup, repeats=repeats)
                extra = {"tflops": flops / (median * 1e-3) / 1e12}
                if cuda:
                    extra["peak_mem_gb"] = peak_memory_gb(call, device)
            except torch.cuda.OutOfMemoryError as e:
                rows.append(unavailable("attention", name, backend, device, f"out of memory: {str(e)[:80]}",
                                        shape=shape, dtype=DTYPE_NAMES[dtype]))
                torch.cuda.empty_cache()
                continue
            if backend == "math":
                baseline_ms = median
            rows.append(Row(part="attention", name=name, backend=backend, device=device_name(device), shape=shape,
                            dtype=DTYPE_NAMES[dtype], unit="ms", median=median, spread=spread, repeats=repeats,
                            baseline="math", ratio=(baseline_ms / median) if baseline_ms else None, extra=extra))
    return rows

"""What the benchmark parts share: a result row, timers, the MFU fields, the MGP shape and synthetic batches.

Each part (``fastlivt/bench/<part>.py``) exposes ``run(quick: bool, device: torch.device) -> list[Row]`` and measures
its comparison *and its baseline in the same run*; ``ratio`` is baseline_time / time (or value / baseline_value for
throughputs), so > 1 means faster than the baseline. A backend that cannot run here is a row with
``unavailable="<reason>"`` and no numbers, never a silent skip.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fastlivt.models.cost import gemm_peak_flops, gemm_peak_size

IMG, PATCH, MASK = 224, 16, 0.75  # the MGP benchmark's image size, patch size and mask ratio (MAE's)
DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fmnist_lt" / "bft.yaml"  # the CPU step's model


def demo_model_spec() -> Dict[str, Any]:
    """``build_vit`` keywords of the demo's classifier, read from :data:`DEMO_CONFIG` (so the CPU step rows follow the
    demo when its model changes)."""
    from fastlivt.config import TrainConfig, load_config

    m = load_config(TrainConfig, DEMO_CONFIG).model
    return dict(arch=m.arch, img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                num_heads=m.num_heads)


@dataclass
class Row:
    part: str  # data | attention | model | loss | step | convert
    name: str  # what is measured, e.g. "encoder fwd+bwd visible-only"
    backend: str  # e.g. ffcv-jpg, dali-cpu, xformers, sdpa, triton, eager
    device: str  # e.g. "cpu (2 cores)", "NVIDIA H100 80GB HBM3"
    shape: str = ""  # e.g. "B=64 L=196 D=384", "N=1024 C=8142"
    dtype: str = ""
    unit: str = "ms"  # ms | img/s | GB/s | ...
    median: Optional[float] = None
    spread: Optional[float] = None  # (max - min) / 2 over the repeats, in `unit`
    repeats: int = 0
    baseline: str = ""  # the backend/name this row is compared with (same run)
    ratio: Optional[float] = None  # > 1: better than the baseline
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. cpu_s_per_img, peak_mem_gb, gbps
    unavailable: Optional[str] = None  # reason; then median/ratio are None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5) -> Tuple[float, float, List[float]]:
    """Median and half-range of ``fn``'s wall time in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (max(times) - min(times)) / 2, times


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on CPU the step runs in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def measure_pair(fns: Dict[bool, Callable[[], None]], device: torch.device, warmup: int, repeats: int
                 ) -> Dict[bool, Optional[Dict[str, float]]]:
    """Time two variants *alternately* (A B A B ...), so background load drifts hit both alike.

    Returns per variant the median/spread in ms and, on CUDA, the peak memory of one call in GB; ``None`` for a
    variant that ran out of CUDA memory.
    """
    times: Dict[bool, List[float]] = {k: [] for k in fns}
    alive = dict.fromkeys(fns, True)
    out: Dict[bool, Optional[Dict[str, float]]] = {}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            if not alive[key]:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
            except torch.cuda.OutOfMemoryError:
                alive[key] = False
                torch.cuda.empty_cache()
                continue
            if i >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)
    for key, fn in fns.items():
        if not alive[key]:
            out[key] = None
            continue
        ts = times[key]
        spread = (max(ts) - min(ts)) / 2 if len(ts) > 1 else None  # one repeat (quick mode): no spread to report
        out[key] = {"median": statistics.median(ts), "spread": spread, "min": min(ts)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            out[key]["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def synthetic_batch(device: torch.device, batch: int, img: int, classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float[batch,3,img,img], labels long[batch] in [0, classes)) on ``device``, the same for every call."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img, img, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    return images, labels


def unavailable(part: str, name: str, backend: str, device: torch.device, reason: str, **kw) -> Row:
    return Row(part=part, name=name, backend=backend, device=device_name(device), unavailable=reason, **kw)


def mfu_extra(img_per_s: float, flops_per_image: float, peak_flops: float) -> Dict[str, float]:
    """The MFU fields of a row: model GFLOP per image, achieved TFLOP/s, the GEMM peak and ``mfu`` (a fraction)."""
    achieved = img_per_s * flops_per_image
    return {"model_gflop_per_img": round(flops_per_image / 1e9, 4), "achieved_tflops": round(achieved / 1e12, 4),
            "gemm_peak_tflops": round(peak_flops / 1e12, 4), "mfu": round(achieved / peak_flops, 4)}


def peak_row(part: str, device: torch.device, dtype: torch.dtype) -> Row:
    """The GEMM peak used as this part's MFU denominator, as a row of its own."""
    peak = gemm_peak_flops(device, dtype)
    n, repeats = gemm_peak_size(device)
    return Row(part=part, name="GEMM peak (MFU denominator)", backend="torch.matmul", device=device_name(device),
               shape=f"{n}x{n}x{n}", dtype=str(dtype).replace("torch.", ""), unit="TFLOP/s", median=peak / 1e12,
               repeats=repeats, extra={"best_of_repeats": True})

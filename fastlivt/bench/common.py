"""What every benchmark part shares: a result row and a timer.

Each part (``fastlivt/bench/<part>.py``) exposes ``run(quick: bool, device: torch.device) -> list[Row]`` and measures
its comparison *and its baseline in the same run*; ``ratio`` is baseline_time / time (or value / baseline_value for
throughputs), so > 1 means faster than the baseline. A backend that cannot run here is a row with
``unavailable="<reason>"`` and no numbers, never a silent skip.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


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


def unavailable(part: str, name: str, backend: str, device: torch.device, reason: str, **kw) -> Row:
    return Row(part=part, name=name, backend=backend, device=device_name(device), unavailable=reason, **kw)


_PEAKS: Dict[Tuple[str, torch.dtype], float] = {}


def gemm_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best dense GEMM rate (FLOP/s) of ``device`` in ``dtype``, measured here once per process: the MFU
    denominator, so that MFU compares against what this device really reaches in this run (a CPU row is a ratio too).
    CUDA: 8192³ (16 384³ is no faster on H100/H200); CPU: 1024³."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        n, repeats = (8192, 10) if device.type == "cuda" else (1024, 5)
        g = torch.Generator(device=device).manual_seed(0)  # private: the global RNG streams stay untouched
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        for _ in range(2):
            a @ b
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        _PEAKS[key] = 2.0 * n ** 3 / best
        del a, b
    return _PEAKS[key]


def mfu_extra(img_per_s: float, flops_per_image: float, peak_flops: float) -> Dict[str, float]:
    """The MFU fields of a row: model GFLOP per image, achieved TFLOP/s, the GEMM peak and ``mfu`` (a fraction)."""
    achieved = img_per_s * flops_per_image
    return {"model_gflop_per_img": round(flops_per_image / 1e9, 4), "achieved_tflops": round(achieved / 1e12, 4),
            "gemm_peak_tflops": round(peak_flops / 1e12, 4), "mfu": round(achieved / peak_flops, 4)}


def peak_row(part: str, device: torch.device, dtype: torch.dtype) -> Row:
    """The GEMM peak used as this part's MFU denominator, as a row of its own."""
    peak = gemm_peak_flops(device, dtype)
    n = 8192 if device.type == "cuda" else 1024
    return Row(part=part, name="GEMM peak (MFU denominator)", backend="torch.matmul", device=device_name(device),
               shape=f"{n}x{n}x{n}", dtype=str(dtype).replace("torch.", ""), unit="TFLOP/s", median=peak / 1e12,
               repeats=10 if device.type == "cuda" else 5, extra={"best_of_repeats": True})

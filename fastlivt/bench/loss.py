"""``fastlivt bench loss``: Balanced-BCE forward+backward — fused Triton kernel vs eager PyTorch vs torch.compile.

Shapes: N = 1,024 rows, C ∈ {365 (Places-LT), 1,000 (ImageNet-LT), 8,142 (iNat18)}, fp32 and bf16 logits; the target
is a mixup target (λ = 0.7, smoothing 0.1) over a long-tailed prior (paper-form bias, τ = 1).

- sass-sm90 (any machine, also ``--quick``): the kernel compiled for sm_90 exactly as the real launch at N = 1,024,
  C = 8,142 bf16 would compile it, read from its SASS (:mod:`fastlivt.kernels.sass`): instructions per logit in the steady-state
  loop, bit width of the logit loads and gradient stores, and the launches and whole N × C passes one forward +
  backward makes (counted at the launch sites; under ``TRITON_INTERPRET=1`` in a child process where no GPU is present);
- every fwd+bwd row runs the backward exactly as the training loop does: ``(loss / accum).backward()`` (the runtime's
  backward, accumulation 1) on logits whose ``.grad`` is cleared before each call;
- eager: ``x = logits + τb`` then ``binary_cross_entropy_with_logits(x, y, reduction='sum') / N`` on the materialised
  N × C soft target (built once, outside the timed region);
- torch.compile: the same function compiled (Inductor);
- triton: :func:`fastlivt.losses.build_loss` with ``fused='triton'`` on the compact MixTarget (no N × C target),
  forward + backward as a user calls it;
- triton kernel (one pass): the fused kernel alone (loss and gradient, no autograd), against the copy bandwidth;
- copy: ``logits.clone()`` — the device's copy bandwidth at the same size, measured in the same run;
- on CUDA at C = 8,142, the one-pass kernel again under every layout of :func:`fastlivt.kernels.launch.launch_candidates`.

GB/s counts 2·N·C·bytes(dtype): the logits read once and the gradient written once (bias, labels and the [N] partial
sums are ignored; the eager path's fp32 temporaries and target are not counted, so its GB/s is an *effective* figure).
On CUDA ``median`` is device time per call from ``torch.profiler`` (the sum of the GPU kernels, copies and fills one call
issues, the L2 flushed — a 512 MiB ``bitwise_not_``, excluded — before every call), so host time never counts as kernel
time; ``extra`` has ``wall_us`` (CUDA events around a loop of back-to-back calls after a synchronisation, CPU overhead
included), ``device_launches`` (GPU kernels per call in the profile), ``fraction_of_copy`` and the ratios to eager and
torch.compile. On CPU the kernel rows are unavailable and the PyTorch path of ``losses.py`` is compared with eager.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastlivt.bench.common import Row, device_name, sync, time_fn, unavailable
from fastlivt.logs import get_logger

log = get_logger(__name__)

PART = "loss"
N = 1024
CLASSES = (365, 1000, 8142)
DTYPES = (torch.float32, torch.bfloat16)
LAM, SMOOTHING = 0.7, 0.1
ACCUM = 1  # the accumulation steps of the runtime backward the fwd+bwd rows run (see _fwd_bwd)
SWEEP_C = 8142  # the shape of the bandwidth target, where the kernel's launch layouts are swept (CUDA only)
COMPILE_BUDGET_S = 120.0  # give up on torch.compile for the remaining shapes once one compilation takes longer


def long_tail_counts(c: int, head: int = 1000, imbalance: float = 100.0) -> List[int]:
    """Exponential profile as in CIFAR-LT: n_i = head · imbalance^(−i/(C−1)), at least 2."""
    return [max(2, int(head * imbalance ** (-i / (c - 1)))) for i in range(c)]


def profiled_us(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                sessions: int = 5) -> Tuple[float, float, float]:
    """(median, half-range, GPU kernels per call) of the device time per call in µs from torch.profiler: ``sessions``
    profiles of ``repeats / sessions`` calls each, the L2 flushed before every call (the flush itself excluded)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    calls = max(1, repeats // sessions)
    per_call: List[float] = []
    launches: List[float] = []
    for _ in range(sessions):
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                flush.bitwise_not_()
                fn()
            sync(device)
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "bitwise_not" not in e.name]
        per_call.append(sum(e.time_range.elapsed_us() for e in events) / calls)
        launches.append(len(events) / calls)
    del flush
    return statistics.median(per_call), (max(per_call) - min(per_call)) / 2, statistics.median(launches)


def wall_time_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall time per call: CUDA events around ``calls`` back-to-back calls, after a synchronisation."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def sass_row(device: torch.device) -> Row:
    """What the kernel compiles to on sm_90 for N = 1,024, C = 8,142 bf16, and its launches per forward + backward."""
    shape, name = f"N={N} C={SWEEP_C}", "Bal-BCE kernel, steady-state loop (sm_90 SASS)"
    try:
        from fastlivt.kernels.sass import sm90_figures

        figures = sm90_figures(N, SWEEP_C, torch.bfloat16)
    except Exception as ex:  # reported, never silent
        return unavailable(PART, name, "sass-sm90", device, f"{type(ex).__name__}: {str(ex)[:200]}", shape=shape,
                           dtype="bfloat16")
    try:  # the launch records need the kernel to run (CUDA or the interpreter); the SASS does not
        from fastlivt.kernels.launch_count import counts_per_call

        counts = counts_per_call(SWEEP_C, torch.bfloat16, device)
        launch_figures = {"launches_per_call": sum(counts["launches"].values()), "launches_by_kernel": counts["launches"],
                          "passes_per_call": counts["passes"]}
    except Exception as ex:  # reported, never silent
        launch_figures = {"launches_per_call": f"unavailable: {type(ex).__name__}: {str(ex)[:200]}"}
    extra = {"instructions_per_logit": figures["instructions_per_logit"], "logit_load_bits": figures["logit_load_bits"],
             "grad_store_bits": figures["grad_store_bits"], **launch_figures,
             "loop_instructions": figures["loop_instructions"],
             "mufu_per_logit": figures["mufu_per_logit"], "block": figures["block"], "num_warps": figures["num_warps"],
             "vector": figures["vector"], "fast_math": figures["fast"]}
    return Row(part=PART, name=name, backend="sass-sm90", device=device_name(device), shape=shape, dtype="bfloat16",
               unit="instr/logit", median=figures["instructions_per_logit"], repeats=1, extra=extra)


def _eager_loss(logits: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = logits + bias  # bf16 + fp32 -> fp32, as under autocast
    return F.binary_cross_entropy_with_logits(x, y, reduction="sum") / logits.shape[0]


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward + backward as the training loop runs it (``TorchRuntime.backward``: the loss divided by the
    accumulation steps, then ``backward()``), the gradient landing in ``logits.grad`` (cleared first, so autograd takes
    the gradient as it is instead of adding it to the last one)."""
    def step() -> torch.Tensor:
        logits.grad = None
        loss = loss_fn(logits)
        (loss / ACCUM).backward()
        return logits.grad

    return step


def _case(c: int, dtype: torch.dtype, device: torch.device, quick: bool, compile_state: Dict[str, object]) -> List[Row]:
    from fastlivt.config import LossConfig
    from fastlivt.losses import build_loss, logit_bias
    from fastlivt.targets import MixTarget

    cuda = device.type == "cuda"
    n = N
    gen = torch.Generator().manual_seed(c)
    counts = long_tail_counts(c)
    bias = logit_bias(counts, "bal_bce").to(device)
    logits = (2.0 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, c, (n,), generator=gen).to(device)
    target = MixTarget(labels, labels.flip(0), LAM, SMOOTHING)
    y = target.dense(c, dtype=torch.float32)
    esize = torch.finfo(dtype).bits // 8
    nbytes = 2 * n * c * esize
    shape, dname, dev = f"N={n} C={c}", str(dtype).replace("torch.", ""), device_name(device)
    unit = "us" if cuda else "ms"
    warmup, repeats = (3, 20 if quick else 100) if cuda else (1, 3 if quick else 7)

    def measure(fn) -> Tuple[float, float, int, Dict[str, float]]:
        if cuda:
            med, spread, kernels = profiled_us(fn, device, warmup, repeats)
            extra = {"wall_us": wall_time_us(fn, device, 20 if quick else 100), "device_launches": kernels}
        else:
            med, spread, _ = time_fn(fn, device, warmup, repeats)
            extra = {}
        t_s = med * (1e-6 if cuda else 1e-3)
        extra["gbps"] = nbytes / t_s / 1e9
        return med, spread, repeats, extra

    rows: List[Row] = []
    ref_loss = _eager_loss(logits.detach().float(), bias, y).item()

    def row(name, backend, med, spread, reps, extra, baseline="", ratio=None) -> Row:
        extra = {"bytes": nbytes, **extra}
        return Row(part=PART, name=name, backend=backend, device=dev, shape=shape, dtype=dname, unit=unit, median=med,
                   spread=spread, repeats=reps, baseline=baseline, ratio=ratio, extra=extra)

    fb = "Bal-BCE fwd+bwd"
    e_med, e_sp, e_rep, e_extra = measure(_fwd_bwd(lambda z: _eager_loss(z, bias, y), logits))
    rows.append(row(fb, "eager", e_med, e_sp, e_rep, e_extra))

    # torch.compile of the same eager function
    c_med: Optional[float] = None
    c_extra: Dict[str, float] = {}
    if compile_state.get("skip"):
        rows.append(unavailable(PART, fb, "torch.compile", device, str(compile_state["skip"]), shape=shape, dtype=dname))
    else:
        try:
            compiled = torch.compile(_eager_loss, dynamic=False)
            t0 = time.perf_counter()
            _fwd_bwd(lambda z: compiled(z, bias, y), logits)()
            sync(device)
            took = time.perf_counter() - t0
            if took > COMPILE_BUDGET_S:
                compile_state["skip"] = f"compilation took {took:.0f} s (> {COMPILE_BUDGET_S:.0f} s budget); skipped"
            c_med, c_sp, c_rep, c_extra = measure(_fwd_bwd(lambda z: compiled(z, bias, y), logits))
            c_extra["compile_s"] = took
            rows.append(row(fb, "torch.compile", c_med, c_sp, c_rep, c_extra, "eager", e_med / c_med))
        except Exception as ex:  # reported, never silent
            reason = f"torch.compile failed: {type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
            compile_state["skip"] = reason
            log.warning("%s", reason)
            rows.append(unavailable(PART, fb, "torch.compile", device, reason, shape=shape, dtype=dname))

    if cuda:
        fused = build_loss(LossConfig(name="bal_bce", fused="triton"), counts, grad_scale=1.0 / ACCUM).to(device)
        got = fused(logits.detach(), target).item()
        x = logits.detach()
        cp_med, cp_sp, cp_rep, cp_extra = measure(lambda: x.clone())
        rows.append(row("copy (logits.clone)", "torch", cp_med, cp_sp, cp_rep, cp_extra))
        t_med, t_sp, t_rep, t_extra = measure(_fwd_bwd(lambda z: fused(z, target), logits))
        t_extra["loss_rel_diff_vs_eager"] = abs(got - ref_loss) / abs(ref_loss)
        t_extra["fraction_of_copy"] = cp_med / t_med
        t_extra["wall_ratio_vs_eager"] = e_extra["wall_us"] / t_extra["wall_us"]
        if c_med is not None:
            t_extra["speedup_vs_compile"] = c_med / t_med
            t_extra["wall_speedup_vs_compile"] = c_extra["wall_us"] / t_extra["wall_us"]
        rows.append(row(fb, "triton", t_med, t_sp, t_rep, t_extra, "eager", e_med / t_med))

        from fastlivt.kernels.bal_bce import bal_bce_forward
        from fastlivt.kernels.launch import launch_candidates, launch_config

        scaled = fused.scaled_bias
        k_med, k_sp, k_rep, k_extra = measure(lambda: bal_bce_forward(x, scaled, label_a=target.label_a,
                                                                      label_b=target.label_b, lam=LAM, smoothing=SMOOTHING))
        k_extra["fraction_of_copy"] = cp_med / k_med
        k_extra["launch_config"] = "x".join(map(str, launch_config(n, c)))
        rows.append(row("fused kernel, one pass (loss + grad)", "triton", k_med, k_sp, k_rep, k_extra,
                        "copy (logits.clone)", cp_med / k_med))
        if c == SWEEP_C:  # the other launch layouts, so one GPU run says which one to make the default
            for cfg in launch_candidates(n, c):
                if cfg == launch_config(n, c):
                    continue
                s_med, s_sp, s_rep, s_extra = measure(lambda: bal_bce_forward(
                    x, scaled, label_a=target.label_a, label_b=target.label_b, lam=LAM, smoothing=SMOOTHING, config=cfg))
                s_extra["fraction_of_copy"] = cp_med / s_med
                rows.append(row(f"fused kernel, launch {'x'.join(map(str, cfg))} (BLOCK x warps)", "triton",
                                s_med, s_sp, s_rep, s_extra, "copy (logits.clone)", cp_med / s_med))
    else:
        reason = "needs CUDA (Triton interpreter timings are meaningless)"
        rows.append(unavailable(PART, fb, "triton", device, reason, shape=shape, dtype=dname))
        torch_path = build_loss(LossConfig(name="bal_bce", fused="torch"), counts).to(device)
        got = torch_path(logits.detach(), target).item()
        p_med, p_sp, p_rep, p_extra = measure(_fwd_bwd(lambda z: torch_path(z, target), logits))
        p_extra["loss_rel_diff_vs_eager"] = abs(got - ref_loss) / abs(ref_loss)
        rows.append(row(fb + " (target built per call)", "torch (losses.py)", p_med, p_sp, p_rep, p_extra, "eager",
                        e_med / p_med))
    return rows


def run_chunks(quick: bool, device: torch.device) -> Iterator[List[Row]]:
    """The rows of the loss benchmark on ``device`` (see the module docstring), one group per (dtype, C) case, each
    written by ``fastlivt bench`` as soon as it is measured (a GPU window that closes mid-part keeps the rest)."""
    compile_state: Dict[str, object] = {}
    if quick and device.type != "cuda":
        compile_state["skip"] = "skipped in --quick on CPU (Inductor's C++ compilation takes tens of seconds per shape)"
    yield [sass_row(device)]
    for dtype in DTYPES:
        for c in CLASSES:
            yield _case(c, dtype, device, quick, compile_state)


def run(quick: bool, device: torch.device) -> List[Row]:
    """All rows of the loss benchmark on ``device``."""
    return [r for chunk in run_chunks(quick, device) for r in chunk]

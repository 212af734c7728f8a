"""Training logs: a tqdm bar (loss, lr, images/s, MFU, loader wait), CSV files and TensorBoard, written by rank 0 only.

Each training row carries ``img_s`` (all ranks together), ``mfu`` (model FLOPs per image x img/s over world x the
GEMM peak measured on this device at start; :func:`mfu_reference`) and ``data_wait``, the fraction of the wall time
since the last row that the loop spent waiting for the loader's next batch (:meth:`TrainLogger.timed`).

``<out>/train.csv`` gets one row every ``log_every`` optimizer steps, ``<out>/eval.csv`` one row per evaluation, and
``<out>/tb/`` the same scalars for TensorBoard. On ``--resume`` the CSV rows logged after the checkpoint's step (by the
interrupted process) are dropped, so each step appears once.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

from fastlivt.data_prep.atomic import atomic_path, disk_full_guard
from fastlivt.logs import get_logger

log = get_logger(__name__)


class CsvLog:
    """Append rows (dicts) to a CSV whose header is fixed by the first row; ``step`` is always the first column."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        self.fields: Optional[List[str]] = None
        if path.is_file() and resume_step is not None:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) <= resume_step]
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)
        elif path.is_file():
            path.unlink()  # a fresh run replaces the old log

    def write(self, row: Dict[str, Any]) -> None:
        with disk_full_guard(self.path):  # a full disk: one line naming the log and the free space
            if self.fields is None:
                self.fields = ["step"] + [k for k in row if k != "step"]
                with open(self.path, "w", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fields).writeheader()
            unknown = set(row) - set(self.fields)
            if unknown:
                raise KeyError(f"{self.path}: column(s) {sorted(unknown)} not in the header {self.fields}")
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)


class TrainLogger:
    """Progress bar + CSV + TensorBoard of one run. Holds the bar, the CSV logs, the TensorBoard writer and the
    counters used for images/s (``images`` seen since the last log line and the time it was written)."""

    def __init__(self, out: str | Path, enabled: bool, total_steps: int, start_step: int, desc: str,
                 progress: bool = True, tensorboard: bool = True, resume: bool = False, flops_per_image: float = 0.0,
                 peak_flops: float = 0.0, world: int = 1):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.images = 0
        self.wait_s = 0.0  # time spent in the loader's next() since the last row
        self.flops_per_image, self.peak_flops, self.world = flops_per_image, peak_flops, world
        self.t0 = time.perf_counter()
        if not enabled:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        resume_step = start_step if resume else None
        self.train_csv = CsvLog(out / "train.csv", resume_step)
        self.eval_csv = CsvLog(out / "eval.csv", resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a declared dependency; say what is missing
                raise RuntimeError(f"run.tensorboard=true but TensorBoard cannot be imported ({e}); install "
                                   f"`tensorboard` or set run.tensorboard=false") from e
            self.tb_dir = out / "tb"
            self.tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step if resume else None)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=True)

    def count(self, images: int) -> None:
        """Add ``images`` (all ranks together) to the images/s counter."""
        self.images += images

    def timed(self, loader: Iterable) -> Iterator:
        """Iterate ``loader``, adding the time each ``next()`` takes to the loader-wait counter."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t0
            yield item

    def step(self, step: int, scalars: Dict[str, float], write: bool) -> Dict[str, float]:
        """Advance the bar to optimizer step ``step``; when ``write``, add img/s and write CSV/TensorBoard."""
        if not self.enabled:
            return scalars
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if not write:
            return scalars
        now = time.perf_counter()
        row = dict(scalars)
        elapsed = max(now - self.t0, 1e-9)
        row["img_s"] = self.images / elapsed
        if self.flops_per_image > 0 and self.peak_flops > 0:
            row["mfu"] = row["img_s"] * self.flops_per_image / (self.world * self.peak_flops)
        row["data_wait"] = min(self.wait_s / elapsed, 1.0)
        self.images, self.wait_s, self.t0 = 0, 0.0, now
        if self.bar is not None:
            extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row.get('lr', 0.0):.2e}",
                                 img_s=f"{row['img_s']:.0f}", **extra, wait=f"{row['data_wait']:.0%}")
        self.train_csv.write({"step": step, **row})
        if self.tb is not None:
            with disk_full_guard(self.tb_dir):  # TensorBoard's writer thread re-raises its write errors here
                for k, v in row.items():
                    self.tb.add_scalar(f"train/{k}", v, step)
        return row

    def eval(self, step: int, epoch: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.eval_csv.write({"step": step, "epoch": epoch, **flat})
        if self.tb is not None:
            with disk_full_guard(self.tb_dir):
                for k, v in flat.items():
                    self.tb.add_scalar(f"eval/{k}", v, step)
        msg = ", ".join(f"{k} {v:.4g}" for k, v in flat.items())
        (self.bar.write if self.bar is not None else log.info)(f"epoch {epoch} eval: {msg}")

    def note(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else log.info)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            tb, self.tb = self.tb, None
            with disk_full_guard(self.tb_dir):
                tb.flush()
                tb.close()


def mfu_reference(cfg: Any, stage: str, num_classes: int, device: Any, bf16: bool, enabled: bool = True) -> Dict[str, Any]:
    """TrainLogger's MFU inputs: ``flops_per_image`` (training FLOPs of the configured model, forward + backward) and
    ``peak_flops`` (the dense GEMM rate measured now on ``device`` in the compute dtype). Rank 0 only (``enabled``)."""
    if not enabled:
        return {}
    import torch

    from fastlivt.models.cost import cost_from_config, gemm_peak_flops

    flops = cost_from_config(cfg, stage, num_classes).train_flops
    peak = gemm_peak_flops(torch.device(device), torch.bfloat16 if bf16 else torch.float32)
    log.info("MFU reference: %.3g GFLOP per training image (%s), GEMM peak %.3g TFLOP/s on %s (%s)", flops / 1e9,
             stage, peak / 1e12, device, "bf16" if bf16 else "fp32")
    return {"flops_per_image": flops, "peak_flops": peak}

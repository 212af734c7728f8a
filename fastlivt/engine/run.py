"""What the training loop hands to a stage: the :class:`Task` protocol (what MGP and BFT add to the loop) and the
:class:`Run` (the state of one training run, complete when built by :func:`fastlivt.engine.loop.build_run`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

import torch
from torch import nn

from fastlivt.config import TrainConfig, to_dict
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine.logger import TrainLogger
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine

LoaderFactory = Callable[[TrainConfig, str, str, Runtime], Any]


class Task(Protocol):
    """What a stage adds to the loop. ``name`` is ``mgp`` or ``bft``, ``stage`` the loader's stage (``pretrain`` or
    ``finetune``); the hooks get the :class:`Run`."""

    name: str
    stage: str

    def build_model(self, cfg: TrainConfig, manifest: Any) -> nn.Module: ...

    def setup(self, run: "Run") -> None: ...  # after prepare(): losses, EMA, eval loader

    def forward(self, run: "Run", images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Dict[str, float]]: ...

    def after_step(self, run: "Run") -> None: ...  # after each optimizer step (EMA update)

    def end_of_epoch(self, run: "Run", epoch: int) -> None: ...  # evaluation, best checkpoint, reconstructions

    def state_dict(self) -> Dict[str, Any]: ...  # goes into checkpoint meta["extra"]

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def finish(self, run: "Run") -> None: ...  # exports


@dataclass
class Run:
    """The state of one training run that the task hooks may read: config, runtime, the model as returned by
    ``runtime.prepare`` (maybe wrapped), the training loader, the schedule, the logger, the output directory, the
    loader factory (for evaluation loaders), the progress (optimizer ``step``, ``epoch``) and a ``summary`` of
    results (exports, last evaluation)."""

    cfg: TrainConfig
    runtime: Runtime
    model: nn.Module
    loader: Any
    schedule: WarmupCosine
    logger: TrainLogger
    out: Path
    manifest_sha256: str
    make_loader: LoaderFactory
    micro_per_epoch: int  # micro-batches per epoch on this rank (whole accumulation cycles)
    per_micro: int  # positions of the epoch's global order one micro-batch takes (batch x world)
    step: int = 0
    epoch: int = 0
    summary: Dict[str, Any] = field(default_factory=dict)
    scalar_sums: Dict[str, torch.Tensor] = field(default_factory=dict)  # finite values, on the device, until logged
    scalar_counts: Dict[str, torch.Tensor] = field(default_factory=dict)  # how many finite values each sum holds
    lock: Any = None  # the run directory's RunLock (rank 0), released when the run ends
    last_good: Optional[Tuple[str, int]] = None  # (checkpoint, step) of the last checkpoint this run can resume from

    @property
    def ckpt_dir(self) -> Path:
        return self.out / ckpt.CKPT_DIR

    def check_finite(self) -> None:
        """Read the device-side non-finite record and act as ``run.nonfinite`` says (raises
        :class:`~fastlivt.engine.nonfinite.NonFiniteError` naming the last good checkpoint; every rank calls it)."""
        monitor = self.runtime.nonfinite
        if monitor is None:
            return
        good = (f"{self.last_good[0]} (step {self.last_good[1]}); --resume continues from it" if self.last_good
                else "none (no checkpoint was written before it)")
        skipped = monitor.check(self.runtime.world, good)
        if skipped:
            self.summary["nonfinite_skipped_steps"] = skipped

    def save(self, tag: str, epoch: int, consumed: int, task: Task, epoch_samples: int = 0) -> None:
        """Checkpoint ``tag`` (every rank calls it): weights + optimizer by the runtime, the rest in ``meta``.
        ``consumed``: positions of ``epoch``'s global order read so far; ``epoch_samples``: where its plan ends.
        Never after a non-finite loss or gradient under ``run.nonfinite=stop`` (:meth:`check_finite` first)."""
        self.check_finite()
        world, batch = self.runtime.world, self.cfg.data.batch_size
        meta = ckpt.build_meta(
            epoch=epoch, batch_in_epoch=consumed // (batch * world), step=self.step,
            sampler={"kind": self.cfg.data.sampler, "seed": self.cfg.run.seed, "epoch": epoch,
                     "samples_consumed": consumed, "epoch_samples": epoch_samples, "world": world,
                     "accum": self.runtime.accum_steps, "batch_size": batch},
            schedule=self.schedule.state_dict(), config=to_dict(self.cfg), manifest_sha256=self.manifest_sha256,
            extra=task.state_dict())
        self.runtime.save(str(self.ckpt_dir), tag, meta)
        if tag == "last":
            self.last_good = (str(self.ckpt_dir / tag), self.step)

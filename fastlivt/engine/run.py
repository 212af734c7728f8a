"""What the training loop hands to a stage: the :class:`Task` protocol (what MGP and BFT add to the loop) and the
:class:`Run` (the state of one training run, complete when built by :func:`fastlivt.engine.build.build_run`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Protocol

import torch
from torch import nn

from fastlivt.config import TrainConfig
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine.logger import TrainLogger
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.engine.train_state import Geometry, TrainState

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

    def state_dict(self) -> Dict[str, Any]: ...  # a checkpoint part (meta["extra"])

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def finish(self, run: "Run") -> None: ...  # exports


@dataclass
class Run:
    """The state of one training run that the task hooks may read: config, runtime, the model as returned by
    ``runtime.prepare`` (maybe wrapped), the training loader, the schedule, the logger, the output directory, the
    loader factory (for evaluation loaders), the :class:`TrainState` (``step`` reads its optimizer step), how an epoch
    is cut (``geometry``), the ``checkpointer`` (``run.checkpointer.save(tag)``), the ``epoch`` being trained and a
    ``summary`` of results (exports, last evaluation)."""

    cfg: TrainConfig
    runtime: Runtime
    model: nn.Module
    loader: Any
    schedule: WarmupCosine
    logger: TrainLogger
    out: Path
    make_loader: LoaderFactory
    state: TrainState
    geometry: Geometry
    checkpointer: Any = None  # fastlivt.engine.checkpointer.Checkpointer, built with the run
    epoch: int = 0
    summary: Dict[str, Any] = field(default_factory=dict)
    scalar_sums: Dict[str, torch.Tensor] = field(default_factory=dict)  # finite values, on the device, until logged
    scalar_counts: Dict[str, torch.Tensor] = field(default_factory=dict)  # how many finite values each sum holds
    lock: Any = None  # the run directory's RunLock (rank 0), released when the run ends

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def ckpt_dir(self) -> Path:
        return self.out / ckpt.CKPT_DIR

    def check_finite(self) -> None:
        """Read the device-side non-finite record and act as ``run.nonfinite`` says (raises
        :class:`~fastlivt.engine.nonfinite.NonFiniteError` naming the last good checkpoint; every rank calls it)."""
        monitor = self.runtime.nonfinite
        if monitor is None:
            return
        last_good = self.checkpointer.last_good if self.checkpointer is not None else None
        good = (f"{last_good[0]} (step {last_good[1]}); --resume continues from it" if last_good
                else "none (no checkpoint was written before it)")
        skipped = monitor.check(self.runtime.world, good)
        if skipped:
            self.summary["nonfinite_skipped_steps"] = skipped

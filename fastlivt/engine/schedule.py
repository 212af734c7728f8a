"""The learning-rate schedule: linear warmup, then a half-cycle cosine down to ``min_lr``, stepped per iteration.

This is MAE's/LiVT's ``util/lr_sched.adjust_learning_rate`` written as a pure function of the global optimizer step
(no hidden state, so a resumed run reproduces the lr of every step exactly). With ``e = step / steps_per_epoch`` the
fractional epoch:

    lr(e) = peak * e / warmup                                                     if e < warmup
    lr(e) = min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))   otherwise

Layer-wise decay multiplies this by each group's ``lr_scale`` (done by :meth:`Runtime.set_lr`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

from fastlivt.config import ConfigError


def warmup_cosine(epoch: float, peak_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The lr at fractional ``epoch`` (MAE's formula; see the module docstring)."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / span) if span > 0 else 1.0
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupCosine:
    """The schedule of one run. Holds the peak lr (``blr * effective_batch / 256`` or ``optim.lr``), the floor
    ``min_lr``, the warmup and total length in epochs and the number of optimizer steps in one epoch."""

    peak_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch} (fewer batches than "
                             f"data.batch_size x optim.accum_iter per epoch?)")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs} must lie in [0, run.epochs={self.epochs}]")

    @property
    def total_steps(self) -> int:
        return int(round(self.epochs * self.steps_per_epoch))

    def __call__(self, step: int) -> float:
        """The lr for the optimizer step with 0-based global index ``step``."""
        return warmup_cosine(step / self.steps_per_epoch, self.peak_lr, self.min_lr, self.warmup_epochs, self.epochs)

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def check_resumable(self, saved: Dict[str, Any]) -> None:
        """Refuse to resume a run whose schedule (and so every later lr) would differ from the saved one."""
        mine = self.state_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            key, (old, new) = next(iter(diff.items()))
            raise ValueError(f"cannot resume: the schedule changed ({key}: checkpoint {old!r}, now {new!r}); "
                             f"batch size, accumulation, world size, epochs and lrs must match the interrupted run")

"""Resume on another number of processes: what the continued run keeps, what it changes, and the log line saying so.

A checkpoint records the world size W, the accumulation A and the micro-batch B it was written with (``meta.sampler``).
Resumed on W' processes:

- the effective batch E = B x A x W (Table 10) is kept by taking A' = A W / W' when W' divides A W; otherwise A' = A
  (the configured accumulation), the effective batch becomes B x A x W', the peak lr follows it when it is derived
  from ``optim.blr`` (``blr x E / 256``), and the number of optimizer steps per epoch changes;
- the optimizer step is re-expressed in the new steps per epoch (the schedule is a function of the fractional epoch,
  so the lr curve continues where it stopped);
- the data position is global (samples of the epoch's plan consumed), so the rest of the epoch is read exactly once;
- the random streams (masks, drop path) are re-seeded from (seed, step, rank): there is no per-rank state to
  carry over to a different set of ranks, so the continued run is not bit-identical to an uninterrupted one (on the
  same world size it still is). The data augmentation draws from (seed, epoch, global positions) instead: a sample's
  crop, RandAugment and erasing box stay the same; the Mixup/CutMix of a batch follows the batch's first position,
  and the erasing noise the batch (both change with the new split of the rest of the epoch into batches).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict

from fastlivt.config import TrainConfig
from fastlivt.logs import get_logger

log = get_logger(__name__)


def launched_world() -> int:
    """The world size the launcher (torchrun / deepspeed) started, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ElasticResume:
    """How a resume maps the checkpoint's (world, accum) onto the new world. ``kept`` is whether the effective batch
    stays the same."""

    old_world: int
    old_accum: int
    world: int
    accum: int
    batch_size: int

    @property
    def changed(self) -> bool:
        return self.world != self.old_world

    @property
    def old_effective(self) -> int:
        return self.batch_size * self.old_accum * self.old_world

    @property
    def effective(self) -> int:
        return self.batch_size * self.accum * self.world

    @property
    def kept(self) -> bool:
        return self.effective == self.old_effective

    def describe(self) -> str:
        if not self.changed:
            return f"same world size {self.world}: exact resume"
        head = (f"resume on {self.world} process(es), checkpoint written on {self.old_world}: accumulation "
                f"{self.old_accum} -> {self.accum}")
        if self.kept:
            return f"{head} keeps the effective batch {self.effective} (= {self.batch_size} x {self.accum} x {self.world})"
        return (f"{head}: the effective batch changes {self.old_effective} -> {self.effective} ({self.world} does not "
                f"divide {self.old_accum} x {self.old_world}); steps per epoch change and, with optim.blr, the peak lr "
                f"scales with it; the schedule continues at the same fractional epoch")


def plan_resume(meta: Dict[str, Any], cfg: TrainConfig, world: int) -> ElasticResume:
    """The accumulation for a resume of ``meta`` on ``world`` processes (logged when the world size changed); ``cfg``
    is only read: the resumed config is built from the plan (:func:`fastlivt.engine.resume.read_resume`)."""
    sampler = meta.get("sampler", {})
    old_world = int(sampler.get("world", world))
    old_accum = int(sampler.get("accum", cfg.optim.accum_iter))
    old_batch = int(sampler.get("batch_size", cfg.data.batch_size))
    if old_batch != cfg.data.batch_size:
        raise ValueError(f"--resume: the checkpoint was written with data.batch_size={old_batch}, the config has "
                         f"{cfg.data.batch_size}; resume with the same micro-batch (accumulation adapts to the world size)")
    accum = cfg.optim.accum_iter
    if old_world != world:
        total = old_accum * old_world
        accum = total // world if total % world == 0 else cfg.optim.accum_iter
    plan = ElasticResume(old_world, old_accum, world, accum, old_batch)
    if plan.changed:
        log.warning("%s", plan.describe())
    return plan


def rescaled_step(epoch: int, consumed: int, steps_per_epoch: int, samples_per_step: int) -> int:
    """The optimizer step at sample position ``consumed`` of ``epoch`` in a run of ``steps_per_epoch`` steps of
    ``samples_per_step`` samples (used when a resume changes the steps per epoch)."""
    return epoch * steps_per_epoch + consumed // samples_per_step


def reseed_for(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams after an elastic resume at optimizer step ``step``."""
    return (seed * 1_000_003 + step * 7919 + rank) % 2**63

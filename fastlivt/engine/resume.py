"""Resuming a run from checkpoint ``last``: where to continue (:class:`Position`), restoring the weights, the
optimizer, the task's state and the random streams — at the point of the timeline where they were captured
(:func:`restoring_rng`) on the same world size, re-seeded on another (:mod:`fastlivt.engine.elastic`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from fastlivt.config import TrainConfig
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine import elastic
from fastlivt.engine.run import Run, Task
from fastlivt.logs import get_logger

log = get_logger(__name__)


@dataclass
class Position:
    """Where the loop (re)starts: ``epoch``, optimizer ``step``, positions of the epoch's global order ``consumed``
    and where that plan ``end``s (0: a fresh epoch), ``reshard`` (the world size changed) and the checkpoint's
    RNG states ``rng`` (restored at the point where they were captured, see :func:`restoring_rng`)."""

    epoch: int = 0
    step: int = 0
    consumed: int = 0
    end: int = 0
    reshard: Optional[elastic.ElasticResume] = None
    rng: Optional[Dict[str, Any]] = None


def read_last_checkpoint(cfg: TrainConfig) -> Dict[str, Any]:
    """The meta of checkpoint ``last``, and the resume plan for this world size (sets ``optim.accum_iter``)."""
    ckpt_dir = Path(cfg.run.out) / ckpt.CKPT_DIR
    if not ckpt.has_checkpoint(ckpt_dir, "last"):
        raise FileNotFoundError(f"--resume: no checkpoint 'last' in {ckpt_dir}")
    saved = ckpt.peek_meta(ckpt_dir, "last")
    return {**saved, "reshard": elastic.plan_resume(saved, cfg, elastic.launched_world())}


def resume_position(saved: Dict[str, Any], cfg: TrainConfig, steps_per_epoch: int, accum: int,
                    per_micro: int) -> Position:
    """Where a resume of ``saved`` continues: the same step on the same world size; on another one the step that
    lies at the same fraction of the epoch under the new steps per epoch."""
    reshard = saved["reshard"]
    sampler = saved["sampler"]
    old_per_micro = cfg.data.batch_size * reshard.old_world
    consumed = int(sampler.get("samples_consumed", saved["batch_in_epoch"] * old_per_micro))
    end = int(sampler.get("epoch_samples", steps_per_epoch * accum * old_per_micro)) if consumed else 0
    step = saved["step"]
    if reshard.changed and saved["schedule"]["steps_per_epoch"] != steps_per_epoch:
        step = elastic.rescaled_step(saved["epoch"], consumed, steps_per_epoch, per_micro * accum)
        log.warning("steps per epoch %d -> %d: optimizer step %d continues as step %d of the new schedule",
                    saved["schedule"]["steps_per_epoch"], steps_per_epoch, saved["step"], step)
    return Position(saved["epoch"], step, consumed, end, reshard)


def restore(run: Run, task: Task, start: Position) -> None:
    """Weights, optimizer and task state from checkpoint ``last``; the schedule checked against the saved one; the
    random streams restored at their capture point (same world) or re-seeded (another world size)."""
    if run.runtime.world != start.reshard.world:
        raise RuntimeError(f"WORLD_SIZE said {start.reshard.world} processes, the runtime has {run.runtime.world}")
    meta = run.runtime.load(str(run.ckpt_dir), "last")
    ckpt.check_meta(meta, str(run.ckpt_dir / "last"), run.manifest_sha256)
    task.load_state_dict(meta["extra"])
    saved_schedule = dict(meta["schedule"])
    if start.reshard.changed:
        if not start.reshard.kept:
            saved_schedule["peak_lr"] = run.schedule.peak_lr
        saved_schedule["steps_per_epoch"] = run.schedule.steps_per_epoch
        run.schedule.check_resumable(saved_schedule)
        ckpt.seed_everything(elastic.reseed_for(run.cfg.run.seed, run.step, run.runtime.rank))
        log.info("random streams re-seeded from (seed, step %d, rank %d): no bit-exact continuation across world "
                 "sizes", run.step, run.runtime.rank)
    else:
        run.schedule.check_resumable(saved_schedule)
        start.rng = meta["rng"]
    log.info("resumed from %s: epoch %d, sample %d of %d, step %d", run.ckpt_dir / "last", start.epoch,
             start.consumed, start.end, run.step)


def restoring_rng(batches: Iterable, rng: Optional[Dict[str, Any]], mid_epoch: bool) -> Iterator:
    """``batches``, with the checkpoint's RNG states ``rng`` restored where they were captured: before the epoch's
    iterator is created for an epoch-boundary checkpoint, after it has produced its first batch for a mid-epoch one
    (creating an iterator, e.g. a DataLoader's, may draw random numbers), or when it ends if nothing was left."""
    if rng is not None and not mid_epoch:
        ckpt.restore_rng(rng)
        rng = None
    for batch in batches:
        if rng is not None:
            ckpt.restore_rng(rng)
            rng = None
        yield batch
    if rng is not None:
        ckpt.restore_rng(rng)

"""Planning a resume from checkpoint ``last``, without touching the config it is given: :func:`read_resume` returns
the config the resumed run goes on with (the accumulation adapted to the world size,
:mod:`fastlivt.engine.elastic`) and a :class:`Resume`, whose :meth:`Resume.state` is the
:class:`~fastlivt.engine.train_state.TrainState` to continue from once the run's geometry is known. The parts are
restored by :meth:`fastlivt.engine.checkpointer.Checkpointer.load`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

from fastlivt.config import TrainConfig
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine import elastic
from fastlivt.engine.train_state import Geometry, TrainState
from fastlivt.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Resume:
    """Checkpoint ``last``'s meta (rank 0's) and how it maps onto this world size."""

    meta: Dict[str, Any]
    reshard: elastic.ElasticResume

    def state(self, geometry: Geometry, steps_per_epoch: int) -> TrainState:
        """Where the resumed run continues: the same step on the same world size; on another one the step that lies
        at the same fraction of the epoch under the new steps per epoch. Positions are global, so the rest of the
        epoch's plan is read exactly once on any world size."""
        saved, reshard = self.meta, self.reshard
        sampler = saved["sampler"]
        old_per_micro = reshard.batch_size * reshard.old_world
        consumed = int(sampler.get("samples_consumed", saved["batch_in_epoch"] * old_per_micro))
        end = int(sampler.get("epoch_samples", geometry.micro_per_epoch * old_per_micro)) if consumed else 0
        step = saved["step"]
        if reshard.changed and saved["schedule"]["steps_per_epoch"] != steps_per_epoch:
            step = elastic.rescaled_step(saved["epoch"], consumed, steps_per_epoch, geometry.per_step)
            log.warning("steps per epoch %d -> %d: optimizer step %d continues as step %d of the new schedule",
                        saved["schedule"]["steps_per_epoch"], steps_per_epoch, saved["step"], step)
        return TrainState(epoch=int(saved["epoch"]), step=int(step), consumed=consumed, end=end)


def read_resume(cfg: TrainConfig) -> Tuple[TrainConfig, Resume]:
    """The config a resume of ``<run.out>/checkpoints/last`` goes on with on the launched world size (a new object:
    ``cfg`` is left as it is) and the :class:`Resume` plan. Read before the runtime is built: the accumulation the
    runtime is built with follows the checkpoint's world."""
    ckpt_dir = Path(cfg.run.out) / ckpt.CKPT_DIR
    if not ckpt.has_checkpoint(ckpt_dir, "last"):
        raise FileNotFoundError(f"--resume: no checkpoint 'last' in {ckpt_dir}")
    meta = ckpt.peek_meta(ckpt_dir, "last")
    reshard = elastic.plan_resume(meta, cfg, elastic.launched_world())
    resumed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, accum_iter=reshard.accum))
    return resumed, Resume(meta, reshard)

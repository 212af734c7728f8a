"""One checkpointer for a run's parts: the model and optimizer (through the runtime, which also keeps every rank's
random streams), the task, the :class:`~fastlivt.engine.train_state.TrainState`, the loader position and the random
streams — each a ``state_dict`` / ``load_state_dict`` part (the ``torch.distributed.checkpoint`` ``Stateful``
protocol). The on-disk format is the runtime's files with the meta dict beside them
(:mod:`fastlivt.engine.checkpoint` lists its entries); :meth:`Checkpointer.save` is the one way a checkpoint is taken.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine import elastic
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.train_state import Geometry, LoaderPosition, TrainState
from fastlivt.logs import get_logger

log = get_logger(__name__)


class RandomStreams:
    """This process's python / numpy / torch (and CUDA) generators. A loaded state is restored where it was captured
    (:meth:`around`): before the epoch's iterator is created for an epoch-boundary checkpoint, after it has produced
    its first batch for a mid-epoch one (creating an iterator, e.g. a DataLoader's, may draw random numbers), or when
    it ends if nothing was left."""

    def __init__(self) -> None:
        self.pending: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        return ckpt.capture_rng()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pending = state

    def reseed(self, seed: int) -> None:
        self.pending = None
        ckpt.seed_everything(seed)

    def around(self, batches: Iterable, mid_epoch: bool) -> Iterator:
        """``batches``, with a loaded state restored at its capture point (once)."""
        rng, self.pending = self.pending, None
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


class Checkpointer:
    """Checkpoints of one run under ``directory``; the ``task``'s state is saved as meta ``extra``. ``before_save`` runs first on every rank (the non-finite check:
    nothing is saved after a non-finite loss or gradient under ``run.nonfinite=stop``). ``last_good`` is the
    (checkpoint, step) this run can resume from, for error messages."""

    def __init__(self, directory: Path, runtime: Runtime, task: Any, state: TrainState, geometry: Geometry,
                 position: LoaderPosition, streams: RandomStreams, schedule: Any, config: Dict[str, Any],
                 manifest_sha256: str, before_save: Callable[[], None]):
        self.directory, self.runtime, self.task, self.state, self.geometry = directory, runtime, task, state, geometry
        self.position, self.streams, self.schedule = position, streams, schedule
        self.config, self.manifest_sha256, self.before_save = config, manifest_sha256, before_save
        self.last_good: Optional[Tuple[str, int]] = None

    def meta(self) -> Dict[str, Any]:
        """The parts' states in the checkpoint format's meta dict."""
        train, extra = self.state.state_dict(), dict(self.task.state_dict())
        return {"epoch": train["epoch"], "batch_in_epoch": train["samples_consumed"] // self.geometry.per_micro,
                "step": train["step"], "sampler": self.position.state_dict(), "schedule": dict(self.schedule.state_dict()),
                "config": self.config, "manifest_sha256": self.manifest_sha256, "extra": extra,
                "rng": self.streams.state_dict()}  # captured last: nothing after it may draw before the save

    def save(self, tag: str) -> None:
        """Checkpoint ``tag`` of the run as it stands (every rank calls it): weights + optimizer by the runtime, the
        other parts in its meta."""
        self.before_save()
        self.runtime.save(str(self.directory), tag, self.meta())
        if tag == "last":
            self.last_good = (str(self.directory / tag), self.state.step)

    def load(self, tag: str, reshard: elastic.ElasticResume, seed: int) -> Dict[str, Any]:
        """Restore ``tag`` into the parts: weights + optimizer by the runtime, the task, the loader position (checked
        against the planned train state), the schedule (checked against the saved one) and the random streams —
        restored at their capture point on the same world size, re-seeded from (seed, step, rank) on another."""
        if self.runtime.world != reshard.world:
            raise RuntimeError(f"WORLD_SIZE said {reshard.world} processes, the runtime has {self.runtime.world}")
        where = self.directory / tag
        meta = self.runtime.load(str(self.directory), tag)
        ckpt.check_meta(meta, str(where), self.manifest_sha256)
        self.task.load_state_dict(meta["extra"])
        self.position.load_state_dict(meta["sampler"])
        saved_schedule = dict(meta["schedule"])
        if reshard.changed:
            if not reshard.kept:
                saved_schedule["peak_lr"] = self.schedule.peak_lr
            saved_schedule["steps_per_epoch"] = self.schedule.steps_per_epoch
            self.schedule.check_resumable(saved_schedule)
            self.streams.reseed(elastic.reseed_for(seed, self.state.step, self.runtime.rank))
            log.info("random streams re-seeded from (seed, step %d, rank %d): no bit-exact continuation across world "
                     "sizes", self.state.step, self.runtime.rank)
        else:
            self.schedule.check_resumable(saved_schedule)
            self.streams.load_state_dict(meta["rng"])
        s = self.state
        log.info("resumed from %s: epoch %d, sample %d of %d, step %d", where, s.epoch, s.consumed, s.end, s.step)
        if tag == "last":
            self.last_good = (str(where), s.step)
        return meta

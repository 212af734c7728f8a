"""Where a run is, as parts that save and load themselves (``state_dict`` / ``load_state_dict``, the
``torch.distributed.checkpoint.stateful.Stateful`` protocol): the :class:`TrainState` (epoch, optimizer step, samples
of the epoch's global order consumed, where the epoch's pass ends) with the position arithmetic of an epoch's pass
over the :class:`Geometry` of the run, and the :class:`LoaderPosition` (the ``sampler`` entry of a checkpoint).

Positions are global: sample ``p`` of an epoch's order is the same sample on any number of processes, so a pass is
``[consumed, end)`` of that order, read by all ranks together, ``per_micro`` positions per micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class Geometry:
    """How one epoch is cut: ``per_micro`` positions of the global order per micro-batch (batch x world), ``accum``
    micro-batches per optimizer step, ``micro_per_epoch`` micro-batches per rank in an epoch (whole cycles)."""

    per_micro: int
    accum: int
    micro_per_epoch: int

    @property
    def epoch_samples(self) -> int:
        """Positions of the global order one whole epoch reads."""
        return self.micro_per_epoch * self.per_micro

    @property
    def per_step(self) -> int:
        return self.per_micro * self.accum


@dataclass
class TrainState:
    """The run's position: ``epoch``, optimizer ``step``, positions of the epoch's global order ``consumed`` and
    where this epoch's pass ``end``s (set when the pass begins; a resume keeps the end it was planned with)."""

    epoch: int = 0
    step: int = 0
    consumed: int = 0
    end: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "samples_consumed": self.consumed, "epoch_samples": self.end}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.consumed, self.end = int(state["samples_consumed"]), int(state["epoch_samples"])

    @property
    def mid_epoch(self) -> bool:
        """Whether part of the epoch's order has been read (a pass resumes inside the epoch)."""
        return self.consumed > 0

    def begin_pass(self, geometry: Geometry) -> int:
        """Start reading the epoch from ``consumed`` (a fresh epoch ends after a whole epoch); the micro-batches of
        this pass per rank: the whole accumulation cycles of what is left of the plan."""
        if not self.mid_epoch:
            self.end = geometry.epoch_samples
        return (self.end - self.consumed) // geometry.per_step * geometry.accum

    def left_out(self, geometry: Geometry, micro_batches: int) -> int:
        """Positions of the pass that make no whole optimizer step of ``micro_batches`` (a resume on another world
        size can leave some); they are not read."""
        return self.end - self.consumed - micro_batches * geometry.per_micro

    def advance(self, geometry: Geometry) -> None:
        """One micro-batch read on every rank."""
        self.consumed += geometry.per_micro

    def end_epoch(self, geometry: Geometry) -> None:
        """The epoch's pass is complete: the next epoch starts at its first position."""
        self.epoch, self.consumed, self.end = self.epoch + 1, 0, geometry.epoch_samples


class LoaderPosition:
    """The loader's place in the data as a global quantity, saved as a checkpoint's ``sampler`` entry: the order's
    ``kind`` and ``seed``, the ``epoch``, the positions consumed and where the pass ends (from the :class:`TrainState`),
    and the ``world`` / ``accum`` / ``batch_size`` it was written with (what an elastic resume maps from).

    :meth:`apply` moves the loader there before a pass (``set_epoch``, then ``seek`` inside an epoch)."""

    def __init__(self, loader: Any, state: TrainState, kind: str, seed: int, world: int, accum: int,
                 batch_size: int):
        self.loader, self.state = loader, state
        self.kind, self.seed, self.world, self.accum, self.batch_size = kind, seed, world, accum, batch_size

    def state_dict(self) -> Dict[str, Any]:
        s = self.state
        return {"kind": self.kind, "seed": self.seed, "epoch": s.epoch, "samples_consumed": s.consumed,
                "epoch_samples": s.end, "world": self.world, "accum": self.accum, "batch_size": self.batch_size}

    def load_state_dict(self, sampler: Dict[str, Any]) -> None:
        """Check that ``sampler`` is where the train state stands (the state was planned from the same checkpoint
        before the runtime existed, see :func:`fastlivt.engine.resume.read_resume`)."""
        consumed = int(sampler.get("samples_consumed", self.state.consumed))
        if (int(sampler.get("epoch", self.state.epoch)), consumed) != (self.state.epoch, self.state.consumed):
            raise RuntimeError(f"the checkpoint's sampler position (epoch {sampler.get('epoch')}, sample {consumed}) "
                               f"differs from the planned one (epoch {self.state.epoch}, sample {self.state.consumed}): "
                               f"was it replaced while the run started?")

    def apply(self) -> None:
        self.loader.set_epoch(self.state.epoch)
        if self.state.mid_epoch:
            self.loader.seek(self.state.consumed, self.state.end)

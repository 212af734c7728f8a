"""The base of every loader backend (:func:`fastlivt.data.registry.build_loader` picks one by ``data.backend``).

What the ffcv, dali and torch backends share lives in :class:`EpochLoader`: the split's manifest, the long-tail
sampler, the per-rank index plan of an epoch (:meth:`EpochLoader.plan`), epoch bookkeeping for exact resumption, and
device-side normalisation. A backend only turns a plan (sample indices in order, already cut to whole batches when
``drop_last``) into batches ``(images float[B,3,H,W] normalised on the device, labels long[B] on the device)``.

Stages (paper Table 9):

* ``pretrain`` (MGP): RandomResizedCrop(scale=data.rrc_scale, ratio 3/4..4/3) + horizontal flip + normalise.
* ``finetune`` (BFT): the same crop/flip, then RandAugment ``data.auto_augment`` per sample (timm's, in the device
  stage every backend shares: :meth:`EpochLoader.device_stage`), normalise; then the batch part (RandomErasing,
  Mixup/CutMix, label smoothing): ``loader.batch_augment``, a :class:`~fastlivt.data.augment.BatchAugment` applied
  by :meth:`EpochLoader.__iter__` to each batch with the batch's global positions, so that the pass yields
  ``(images, MixTarget)`` (:class:`~fastlivt.targets.MixTarget`) instead of ``(images, labels)``.
* ``eval``: resize the shorter side to int(img_size / eval_crop_pct) (bicubic) and center-crop img_size; the written
  order, no drop_last.
"""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from fastlivt.data_prep.manifest import load_manifest
from fastlivt.config import ConfigError, TrainConfig
from fastlivt.data import device_randaugment as dra
from fastlivt.data.augment import BatchAugment, Normalize
from fastlivt.data.device_stage import DeviceStage
from fastlivt.data.sample_rng import SampleParams, epoch_positions, train_params
from fastlivt.data.sampling import LongTailSampler
from fastlivt.logs import get_logger

STAGES = ("pretrain", "finetune", "eval")
log = get_logger(__name__)
_OPEN: "weakref.WeakSet[EpochLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """Join the backends' threads before the interpreter tears down (an unjoined native thread aborts the exit)."""
    for loader in list(_OPEN):
        try:
            loader.close()
        except Exception as e:  # at exit: report, never raise
            log.warning("closing %s loader at exit: %s", loader.backend, e)


def batch_device(device) -> torch.device:
    """Where a loader puts its batches: ``device`` as given (the runtime's), or, when none is given (``None`` or
    ``"auto"``: a loader built on its own, e.g. by a benchmark), the current CUDA device, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


class EpochLoader:
    """Base of every backend. Iterating yields one epoch of ``(images, labels)`` for this rank (``(images,
    MixTarget)`` with a ``batch_augment``).

    * ``len(loader)``: batches per epoch, the same on every rank (ceil(N / world) indices per rank, then
      floor or ceil by ``batch_size`` depending on ``drop_last``).
    * ``set_epoch(e)``: the epoch the next pass reads; the order is a pure function of (run.seed, e). A completed pass
      advances the epoch by one by itself, so calling ``set_epoch`` before every epoch is optional but harmless.
    * ``seek(consumed, end)``: the next pass reads positions [consumed, end) of its epoch's global order, split over
      this loader's world (exact resume from a mid-epoch checkpoint on any number of ranks: ``set_epoch(e)``, then
      ``seek``; n whole batches into an epoch of whole batches is ``seek(n * batch_size * world,
      len(loader) * batch_size * world)``).
    * the contract of all this: :class:`fastlivt.data.contract.BatchLoader`.
    * images are float32 with the values of ``(x/255 - mean) / std``.
    * ``batch_augment``: for ``finetune`` with any of data.mixup/cutmix/reprob/smoothing > 0, the BatchAugment each
      pass applies to its batches, which then yields ``(images, MixTarget)`` (see module docstring); ``None``
      otherwise. ``manifest``: the split's manifest;
      ``num_samples``: N. With world > 1 and N not divisible by world, the last ranks' plans end with wrapped-around
      repeats of the epoch's first samples (torch DistributedSampler's padding); evaluators that gather predictions
      should keep the first N of the rank-interleaved order.
    """

    backend = "base"

    def __init__(self, cfg: TrainConfig, split: str, stage: str, device=None, rank: int = 0, world: int = 1):
        if split not in ("train", "val"):
            raise ValueError(f"build_loader: split must be 'train' or 'val', got {split!r}")
        if stage not in STAGES:
            raise ValueError(f"build_loader: stage must be one of {STAGES}, got {stage!r}")
        directory = getattr(cfg.data, split)
        if not directory:
            raise ConfigError(f"data.{split} is empty: set it to the directory holding the converted split's manifest.json")
        d = cfg.data
        if d.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
        if d.batches_ahead < 1:  # FFCV's queue of 0 would be unbounded over its batches_ahead + 2 buffer slots
            raise ConfigError(f"data.batches_ahead must be >= 1 (batches prepared ahead of the step), got "
                              f"{d.batches_ahead}")
        self.cfg, self.split, self.stage, self.rank, self.world = cfg, split, stage, rank, world
        self.device = batch_device(device)
        self.manifest = load_manifest(directory)
        self.labels = self.manifest.labels()
        self.num_samples = self.manifest.num_samples
        self.batch_size = d.batch_size
        self.img_size = d.img_size
        self.train = stage != "eval"
        self.drop_last = d.drop_last if self.train else False
        self.sampler = LongTailSampler(self.labels, self.manifest.num_classes,
                                       d.sampler if self.train else "instance", seed=cfg.run.seed,
                                       total_epochs=cfg.run.epochs, shuffle=self.train)
        per_rank = self.sampler.per_rank(world)
        self._len = per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        if self._len == 0:
            raise ValueError(f"{directory}: {per_rank} samples per rank (N={self.num_samples}, world={world}) make no "
                             f"whole batch of {self.batch_size} with drop_last")
        self.normalize = Normalize(d.mean, d.std, self.device)
        self.batch_augment: Optional[BatchAugment] = None
        self.auto_augment = d.auto_augment if stage == "finetune" else None
        self.rand_augment = dra.parse_policy(self.auto_augment) if self.auto_augment else None
        self.shared_stage = DeviceStage(d.mean, d.std, self.device, cfg.run.seed, self.rand_augment)
        self.hand_over_only = False  # `fastlivt bench data`: stop at the hand-over (host work and draws only)
        if stage == "finetune" and (d.mixup > 0 or d.cutmix > 0 or d.reprob > 0 or d.smoothing > 0):
            if (d.mixup > 0 or d.cutmix > 0) and (self.batch_size % 2 or not self.drop_last):
                raise ValueError(f"Mixup/CutMix needs even, whole batches: data.batch_size={self.batch_size} "
                                 f"(must be even) and data.drop_last={d.drop_last} (must be true)")
            num_classes = cfg.model.num_classes or self.manifest.num_classes
            self.batch_augment = BatchAugment(num_classes, d.mixup, d.cutmix, d.smoothing, d.reprob, seed=cfg.run.seed)
        self.epoch = 0
        self._seek: Optional[Tuple[int, int]] = None  # (consumed, end) of the next pass, global positions
        self._pass_offset = 0  # global positions of the epoch consumed before the current pass
        _OPEN.add(self)

    # ------------------------------------------------------------------------------------------------ epochs
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def seek(self, consumed: int, end: int) -> None:
        if not 0 <= consumed <= end:
            raise ValueError(f"seek: need 0 <= consumed <= end, got consumed={consumed} end={end}")
        self._seek = (int(consumed), int(end))

    def plan(self, epoch: Optional[int] = None, seek: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """This rank's sample indices for ``epoch`` in reading order: whole batches only when drop_last; with
        ``seek=(consumed, end)`` positions [consumed, end) of the epoch's global order instead."""
        epoch = self.epoch if epoch is None else epoch
        if seek is not None:
            idx = self.sampler.indices(epoch, self.rank, self.world, *seek)
            n = idx.size // self.batch_size if self.drop_last else math.ceil(idx.size / self.batch_size)
            return idx[: n * self.batch_size]
        idx = self.sampler.indices(epoch, self.rank, self.world)
        return idx[: self._len * self.batch_size]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        seek, self._seek = self._seek, None
        indices = self.plan(seek=seek)
        self._pass_offset = seek[0] if seek is not None else 0
        if indices.size:
            if self.batch_augment is None or self.hand_over_only:
                yield from self._iterate(indices)
            else:  # the backends yield the plan's batches in order: batch k holds the next len(labels) positions
                positions, first, epoch = self.positions(indices), 0, self.epoch
                for images, labels in self._iterate(indices):
                    batch_positions, first = positions[first:first + len(labels)], first + len(labels)
                    yield self.batch_augment(images, labels, epoch, batch_positions)
        self.epoch += 1

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """Global positions in this epoch's order of ``indices``, the plan of the current pass: the keys of the
        per-sample random parameters (:mod:`fastlivt.data.sample_rng`), the same whatever the world size or resume."""
        return epoch_positions(self.rank, self.world, self._pass_offset, indices.size)

    def sample_params(self, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> SampleParams:
        """Crop window and flip of each of ``indices`` (a pass's plan) in the current epoch."""
        return train_params(self.cfg.run.seed, self.epoch, self.positions(indices), heights, widths, self.rrc_scale())

    def device_stage(self, images: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """The per-pixel work every backend shares after its crop, on the batch's device: timm's RandAugment per
        sample (finetune with data.auto_augment, with the draws of the samples at the epoch's global ``positions``),
        then normalisation. uint8 ``[B,3,H,W]`` in,
        float32 out (:class:`~fastlivt.data.device_stage.DeviceStage`). With ``hand_over_only`` the host side alone
        (the draws, copied to the device) runs and the uint8 images come back as they are."""
        draws = self.shared_stage.draws(self.epoch, positions, images.device)
        return images if self.hand_over_only else self.shared_stage.apply(images, draws)

    def close(self) -> None:
        """Stop the backend's threads (also run at interpreter exit, and by ``with loader:``)."""
        _OPEN.discard(self)

    def __enter__(self) -> "EpochLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ backends
    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _labels_to_device(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.reshape(-1).to(self.device, dtype=torch.long, non_blocking=True, copy=True)

    def rrc_scale(self) -> Tuple[float, float]:
        return tuple(self.cfg.data.rrc_scale)

    def eval_resize(self) -> int:
        return int(self.img_size / self.cfg.data.eval_crop_pct)

    def describe(self) -> str:
        aug = {"pretrain": "RRC+flip", "finetune": f"RRC+flip+{self.auto_augment or 'no RandAugment'}",
               "eval": f"resize {self.eval_resize()} + center crop"}[self.stage]
        return (f"{self.backend} loader: {self.split}/{self.stage} N={self.num_samples} rank {self.rank}/{self.world} "
                f"batch {self.batch_size} x {len(self)} per epoch, {self.img_size}px {aug}, sampler "
                f"{self.sampler.strategy}, device {self.device}")

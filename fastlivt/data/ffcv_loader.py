"""FFCV backend: the split's ``.beton`` read through FFCV's compiled pipelines.

Image pipeline on the host: :class:`~fastlivt.data.ffcv_ops.SeededRRCDecoder` (train: RandomResizedCrop + flip) or
``CenterCropRGBImageDecoder(ratio=eval_crop_pct)`` (eval), ``ToTensor``, ``ToDevice``, ``ToTorchImage``; the uint8
batch then goes through the device stage every backend shares (:meth:`EpochLoader.device_stage`: timm's RandAugment
per sample for finetune with ``data.auto_augment``, normalisation) on the loader's device. Every random parameter
(crop window, flip, RandAugment draws) is computed on the host from (run.seed, epoch, global position) by
:mod:`fastlivt.data.sample_rng`: the crop's for the whole pass, handed to the decoder per batch
(:class:`~fastlivt.data.ffcv_ops.PlanLoader`), RandAugment's per batch as it reaches the device stage, so batches
are the same in every run, with any number of workers. The
long-tail sampler enters as :class:`PlanOrder`, a ``TraversalOrder`` *instance* (FFCV 1.0.2 calls ``order(loader)`` on
it) that returns the plan the base class computed for the current (epoch, skip); FFCV's own ``distributed`` mode is
not used: the plan already holds only this rank's indices. ``data.os_cache`` and ``data.batches_ahead`` are passed on.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import torch

from fastlivt.data_prep.manifest import ManifestError
from fastlivt.data.base import EpochLoader
from fastlivt.logs import get_logger

try:
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - ffcv is a hard dependency of this backend
    raise ImportError(f"data.backend=ffcv needs ffcv 1.0.2 (pip install ffcv): {e}") from e

log = get_logger(__name__)


class PlanOrder(TraversalOrder):
    """A TraversalOrder whose every epoch is the indices last handed to :meth:`set` (in that order)."""

    def __init__(self, first: np.ndarray):
        self.current = np.asarray(first, dtype=np.uint64)  # FFCV's base __init__ runs in __call__, when it has the loader

    def __call__(self, loader) -> "PlanOrder":
        TraversalOrder.__init__(self, loader)
        return self

    def set(self, indices: np.ndarray) -> None:
        self.current = np.asarray(indices, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.current


class FFCVLoader(EpochLoader):
    backend = "ffcv"

    def __init__(self, cfg, split, stage, device=None, rank=0, world=1):
        super().__init__(cfg, split, stage, device, rank, world)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        from fastlivt.data.ffcv_ops import PlanLoader, SeededRRCDecoder

        if not self.manifest.ffcv:
            raise ManifestError(f"{self.manifest.root}: no .beton in the manifest (convert with --formats ffcv)")
        path = self.manifest.path(self.manifest.ffcv)
        if not path.is_file():
            raise ManifestError(f"{path}: .beton named in the manifest is missing")
        d, size = cfg.data, self.img_size
        self.decoder = None
        if self.train:
            self.decoder = SeededRRCDecoder((size, size))
            image = [self.decoder]
        else:
            image = [CenterCropRGBImageDecoder((size, size), ratio=d.eval_crop_pct)]
        non_blocking = self.device.type == "cuda"
        image += [ToTensor(), ToDevice(self.device, non_blocking=non_blocking), ToTorchImage()]
        label = [IntDecoder(), ToTensor(), ToDevice(self.device, non_blocking=non_blocking)]
        self.order = PlanOrder(self.plan(0))
        self.loader = PlanLoader(str(path), batch_size=self.batch_size, num_workers=max(1, d.workers), os_cache=d.os_cache,
                             order=self.order, distributed=False, seed=cfg.run.seed,
                             pipelines={"image": image, "label": label}, drop_last=False,
                             batches_ahead=d.batches_ahead)
        if self.loader.reader.num_samples != self.num_samples:
            raise ManifestError(f"{path}: {self.loader.reader.num_samples} rows, manifest says {self.num_samples}")
        image_meta = self.loader.reader.metadata[f"f{list(self.loader.reader.handlers).index('image')}"]
        self.heights = image_meta["height"].astype(np.int64)
        self.widths = image_meta["width"].astype(np.int64)
        log.debug("ffcv pipelines: image=%s", [type(op).__name__ for op in image])

    def _param_tables(self, indices: np.ndarray):
        if not self.train:
            return {}
        params = self.sample_params(indices, self.heights[indices], self.widths[indices])
        return {self.decoder: np.concatenate([params.windows, params.flip[:, None].astype(np.int64)], axis=1)}

    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.order.set(indices)
        self.loader.set_tables(self._param_tables(indices))
        positions, first = self.positions(indices), 0
        try:
            for images, labels in self.loader:  # FFCV yields the plan's batches in order
                # FFCV recycles its output buffers: the device stage (a new tensor) and the label copy make the batch ours
                batch_positions, first = positions[first:first + images.shape[0]], first + images.shape[0]
                yield self.device_stage(images, batch_positions), self._labels_to_device(labels)
        finally:  # a pass left midway: its thread would keep decoding batches ahead
            self.loader.stop()

    def close(self) -> None:
        super().close()
        loader = getattr(self, "loader", None)
        if loader is not None:
            loader.close()

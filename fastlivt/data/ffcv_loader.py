"""FFCV backend: the split's ``.beton`` read through FFCV's compiled pipelines; every pixel handled on the device.

On the host, FFCV's pipeline only copies each sample's stored bytes — raw pixels or the JPEG — into one pinned row per
sample (:class:`~fastlivt.data.ffcv_ops.StoredBytes`, parallel over the batch in ``data.workers`` threads; the row
layout is in its docstring), and the crop windows, flips and RandAugment draws are computed from (run.seed, epoch,
global position) by :mod:`fastlivt.data.sample_rng` (the crop's for the whole pass, RandAugment's per batch). On the
loader's device, per batch, in the code every backend shares: raw rows are copied over (a side CUDA stream) and
viewed as one padded ``[B,3,H,W]`` batch (the padding is read only with weight 0 by the crop); JPEG rows are decoded by
:func:`~fastlivt.data.device_decode.decode_batch` (nvJPEG on CUDA, on the side stream; libjpeg-turbo for the CPU);
then :func:`~fastlivt.data.device_crop.crop_resize` (train: RandomResizedCrop + flip with each sample's window) or
:func:`~fastlivt.data.device_crop.resize_center_crop` (eval: the torch backend's Resize + CenterCrop), then the
device stage every backend shares (:class:`~fastlivt.data.device_stage.DeviceStage`: RandAugment for finetune,
normalisation). So batches are the same in every run with any number of workers, and a raw .beton gives the torch
backend's pixels for the same images.

The long-tail sampler enters as :class:`PlanOrder`, a ``TraversalOrder`` *instance* (FFCV 1.0.2 calls ``order(loader)``
on it) that returns the plan the base class computed for the current (epoch, skip); FFCV's own ``distributed`` mode is
not used: the plan already holds only this rank's indices. ``data.os_cache`` and ``data.batches_ahead`` are passed on.
Where the per-batch work runs: with the CPU as the device, in FFCV's epoch thread, ``data.batches_ahead`` batches
ahead of the training step (as FFCV's own decoding did); on CUDA, in the iterating thread, its kernels queued on the
current stream, and, as FFCV may rewrite a batch's host rows as soon as the next batch is taken, the copy of a
batch's rows to the device is waited for before the next batch is taken.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from fastlivt.data_prep.manifest import ManifestError
from fastlivt.data import device_crop as dc
from fastlivt.data import device_decode as dd
from fastlivt.data.base import EpochLoader
from fastlivt.logs import get_logger

try:
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - ffcv is a hard dependency of this backend
    raise ImportError(f"data.backend=ffcv needs ffcv 1.0.2 (pip install ffcv): {e}") from e
from fastlivt.data.ffcv_ops import HEADER_BYTES, RAW, Failed, StoredBytes, jpeg_max_bytes, row_header  # noqa: E402

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
        from ffcv.reader import Reader
        from ffcv.transforms import ToDevice, ToTensor

        from fastlivt.data.ffcv_ops import PlanLoader

        if not self.manifest.ffcv:
            raise ManifestError(f"{self.manifest.root}: no .beton in the manifest (convert with --formats ffcv)")
        path = self.manifest.path(self.manifest.ffcv)
        if not path.is_file():
            raise ManifestError(f"{path}: .beton named in the manifest is missing")
        self.path, d = path, cfg.data
        self.rows_op = StoredBytes(jpeg_max_bytes(Reader(str(path)), "image"), str(path))
        non_blocking = self.device.type == "cuda"
        label = [IntDecoder(), ToTensor(), ToDevice(self.device, non_blocking=non_blocking)]
        self.order = PlanOrder(self.plan(0))
        self.loader = PlanLoader(str(path), batch_size=self.batch_size, num_workers=max(1, d.workers), os_cache=d.os_cache,
                                 order=self.order, distributed=False, seed=cfg.run.seed,
                                 pipelines={"image": [self.rows_op, ToTensor()], "label": label}, drop_last=False,
                                 batches_ahead=d.batches_ahead)
        if self.loader.reader.num_samples != self.num_samples:
            raise ManifestError(f"{path}: {self.loader.reader.num_samples} rows, manifest says {self.num_samples}")
        image_meta = self.loader.reader.metadata[f"f{list(self.loader.reader.handlers).index('image')}"]
        self.heights = image_meta["height"].astype(np.int64)
        self.widths = image_meta["width"].astype(np.int64)
        self.max_height, self.max_width, _ = self.rows_op.layout()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        jpeg = int((image_meta["mode"] == 0).sum())
        log.info("ffcv loader: %s: %d raw + %d JPEG samples; host reads bytes, %s decode + crop on %s", path.name,
                 self.num_samples - jpeg, jpeg, "nvJPEG" if self.device.type == "cuda" else "CPU", self.device)

    # ------------------------------------------------------------------------------------------------ one batch
    def _rows_to_device(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """FFCV's pinned rows on the device (the rows themselves on the CPU), and the event after which FFCV may
        reuse them: copied on a side stream, so the copy waits for no training work queued before it."""
        if self._copy_stream is None:
            return rows, None
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            on_device = rows.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        current.wait_event(copied)
        on_device.record_stream(current)
        return on_device, copied

    def _decode(self, encoded, names):
        """The JPEG rows decoded on the device. On CUDA on the side stream, after the work queued there: nvJPEG
        writes on its own stream into memory allocated on the caller's, without waiting for that stream's queued
        kernels (which may still read memory just freed), so the caller must not be the training stream."""
        if self._copy_stream is None:
            return dd.decode_batch(encoded, names, self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.synchronize()  # only this loader's copies and decodes run on it
            images = dd.decode_batch(encoded, names, self.device)
        current.wait_stream(self._copy_stream)
        for image in images:
            image.record_stream(current)
        return images

    def _pixels(self, rows: torch.Tensor, header: np.ndarray, indices: np.ndarray):
        """The rows' images on the device — a padded uint8 ``[B,3,H,W]`` batch, or, when every row is a JPEG, the
        decoded ``[3,H,W]`` images as they are (the crop pads them if its way of cropping needs a batch) — and the
        copy's event."""
        n, raw = rows.shape[0], header[:, 2] == RAW
        pixels, copied = None, None
        if raw.any():
            on_device, copied = self._rows_to_device(rows)
            area = self.max_height * self.max_width * 3
            pixels = on_device[:, HEADER_BYTES:HEADER_BYTES + area].view(n, self.max_height, self.max_width, 3)
            # what lies outside each image is left as it is: the crop gives it weight 0 (device_crop)
            pixels = pixels.permute(0, 3, 1, 2)
        if not raw.all():
            jpeg = np.flatnonzero(~raw)
            encoded = [rows[i, HEADER_BYTES:HEADER_BYTES + int(header[i, 3])] for i in jpeg]
            names = [f"{self.path}: row {int(indices[i])}" for i in jpeg]
            images = self._decode(encoded, names)
            if pixels is None:
                return images, copied
            # a file of mixed modes: the decoded JPEGs take their rows' places in a copy of the raw batch
            decoded, _ = dc.pad_to_batch(images)
            pixels = pixels.clone() if copied is None else pixels  # on the CPU, the rows FFCV will reuse
            at = torch.from_numpy(jpeg)
            at = at if self._copy_stream is None else at.pin_memory().to(self.device, non_blocking=True)
            pixels[at, :, :decoded.shape[2], :decoded.shape[3]] = decoded
        height, width = int(header[:, 0].max()), int(header[:, 1].max())  # the batch's extent
        return pixels[:, :, :height, :width], copied

    def _images(self, rows: torch.Tensor, indices: np.ndarray, params, at: slice):
        """The uint8 ``[B,3,S,S]`` crops of a batch of rows (train: each sample's window and flip; eval: resize +
        center crop), and the event after which FFCV may reuse the rows."""
        header = row_header(rows)
        pixels, copied = self._pixels(rows, header, indices)
        if params is None:
            return dc.resize_center_crop(pixels, header[:, :2], self.eval_resize(), self.img_size), copied
        return dc.crop_resize(pixels, params.windows[at], params.flip[at], self.img_size), copied

    # ------------------------------------------------------------------------------------------------ one epoch
    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, positions, b = self.epoch, self.positions(indices), self.batch_size
        params = self.sample_params(indices, self.heights[indices], self.widths[indices]) if self.train else None

        def finish(b_ix: int, batch):
            """FFCV's (rows, labels) of batch ``b_ix`` -> (images, labels, the rows' copy event)."""
            rows, labels = batch
            at = slice(b_ix * b, b_ix * b + rows.shape[0])
            if self.hand_over_only:  # `fastlivt bench data`: the host's part ends with the rows handed over
                copied = None
                if (row_header(rows)[:, 2] == RAW).any():  # JPEG bytes go to the decoder from host memory
                    copied = self._rows_to_device(rows)[1]
                self.shared_stage.draws(epoch, positions[at], self.device)
                return rows, labels, copied
            images, copied = self._images(rows, indices[at], params, at)
            draws = self.shared_stage.draws(epoch, positions[at], images.device)
            return self.shared_stage.apply(images, draws), labels, copied

        # CPU: the per-batch work runs in FFCV's epoch thread, batches_ahead ahead of the training step, as FFCV's
        # own decoding did; CUDA: here, its kernels queued on the current stream (launches do not wait for them)
        in_thread = self._copy_stream is None
        self.order.set(indices)
        self.loader.set_finish(finish if in_thread else None)
        batches, copied = iter(self.loader), None  # FFCV yields the plan's batches in order
        try:
            for b_ix in itertools.count():
                if copied is not None:  # the last batch's rows are on the device before FFCV may reuse them
                    copied.synchronize()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                if isinstance(batch, Failed):
                    raise batch.error
                images, labels, copied = batch if in_thread else finish(b_ix, batch)
                yield images, self._labels_to_device(labels)
        finally:  # a pass left midway: its thread would keep reading batches ahead
            if copied is not None:  # the next pass writes into the same rows
                copied.synchronize()
            self.loader.stop()

    def close(self) -> None:
        super().close()
        loader = getattr(self, "loader", None)
        if loader is not None:
            loader.close()

"""DALI backend: encoded images from the webdataset shards, decoded and cropped by a DALI pipeline.

The sampler's plan enters through ``fn.external_source``: a callable that hands DALI the next batch of encoded bytes
(read by offset, :class:`~fastlivt.data.shards.ShardReader`) and int32 labels, and raises ``StopIteration`` at the end
of the plan, so an epoch is exactly the plan (a smaller last batch when not drop_last) and nothing spills over.

Device: with ``data.dali_device`` = auto and CUDA available (and a CUDA training device), decoding is ``mixed``
(nvJPEG) and the crop's resize runs on the GPU; otherwise the whole graph is CPU (``device_id=None``).
``dali_device=gpu`` without CUDA is an error. The choice is logged.

The graph: ``decoders.image_slice`` of the RandomResizedCrop window (area data.rrc_scale, aspect 3/4..4/3) + bicubic
resize + mirror (train), or ``decoders.image`` + shorter-side bicubic resize + center crop (eval), out as uint8 HWC.
The rest is the device stage every backend shares (:meth:`EpochLoader.device_stage`): timm's RandAugment per sample
for finetune with ``data.auto_augment`` (:mod:`fastlivt.data.device_randaugment`), then normalisation, on the
loader's device.

Reproducibility: the graph holds no DALI random operator. The crop window and the flip of every sample are computed
on the host from (run.seed, epoch, global position) (:mod:`fastlivt.data.sample_rng`; the window needs the image
size, read from the JPEG header once per sample) and fed through the external source with the encoded bytes, and
RandAugment's draws come from the same triple: batches are the same in every run, with any number of threads, and a
resumed pass continues with the parameters the uninterrupted one would have used.
"""
from __future__ import annotations

import gc
import os
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch

from fastlivt.config import ConfigError
from fastlivt.data.base import EpochLoader
from fastlivt.data.sample_rng import flips, rrc_windows, sample_keys
from fastlivt.data.shards import ShardReader, encoded_size
from fastlivt.logs import get_logger

log = get_logger(__name__)


def _freeze_garbage_in_child() -> None:
    """In a forked child (a DataLoader worker), never let the cyclic GC finalise what the parent left: an unclosed
    DALI pipeline's destructor waits on executor threads that exist only in the parent, and hangs the child."""
    gc.freeze()


os.register_at_fork(after_in_child=_freeze_garbage_in_child)


class _PlanSource:
    """The external_source callable: the next batch of (encoded images, labels) of ``batches`` and, for training, the
    per-sample parameters (``params(indices, positions, encoded)`` -> one list of per-sample arrays per further
    output); StopIteration at the end."""

    def __init__(self, reader: ShardReader, labels: np.ndarray):
        self.reader, self.labels = reader, labels.astype(np.int32)
        self.batches: List[np.ndarray] = []
        self.positions = np.zeros(0, np.int64)
        self.params: Callable = lambda idx, positions, encoded: []
        self.next = 0

    def start(self, batches: List[np.ndarray], positions: np.ndarray, params: Callable) -> None:
        self.batches, self.positions, self.next, self.params = batches, positions, 0, params
        self.offsets = np.cumsum([0] + [b.size for b in batches])

    def __call__(self) -> Tuple[List[np.ndarray], ...]:
        if self.next >= len(self.batches):
            raise StopIteration
        idx, first = self.batches[self.next], self.offsets[self.next]
        self.next += 1
        encoded = [self.reader[int(i)] for i in idx]
        positions = self.positions[first:first + idx.size]
        return (encoded, [self.labels[i:i + 1] for i in idx], *self.params(idx, positions, encoded))


def _build_pipeline(source, stage: str, size: int, resize: int, decode: str, batch_size: int, num_threads: int,
                    device_id, seed: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    train = stage != "eval"
    outputs = 2 + (3 if train else 0)
    dtypes = [types.UINT8, types.INT32] + [types.FLOAT, types.FLOAT, types.INT32][:outputs - 2]

    @pipeline_def
    def pipeline():
        jpegs, labels, *params = fn.external_source(source=source, num_outputs=outputs, batch=True, dtype=dtypes)
        mirror = False
        if not train:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_CUBIC)
        else:
            anchor, shape, mirror = params  # (left, top), (width, height): image_slice's default axes "WH"
            images = fn.decoders.image_slice(jpegs, anchor, shape, device=decode, output_type=types.RGB,
                                             normalized_anchor=False, normalized_shape=False)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC)
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", crop=(size, size),
                                          mirror=mirror)
        return images, labels

    return pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch)


class DALILoader(EpochLoader):
    backend = "dali"

    def __init__(self, cfg, split, stage, device=None, rank=0, world=1):
        super().__init__(cfg, split, stage, device, rank, world)
        from nvidia.dali.backend import GetCUDADeviceCount

        want = cfg.data.dali_device
        if want not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"data.dali_device must be auto, cpu or gpu, got {want!r}")
        cuda = torch.cuda.is_available() and GetCUDADeviceCount() > 0
        if want == "gpu" and not cuda:
            raise RuntimeError("data.dali_device=gpu asks for nvJPEG ('mixed') decoding, but no CUDA device is "
                               "available (torch.cuda.is_available() is False); use dali_device=cpu or auto")
        self.mixed = want == "gpu" or (want == "auto" and cuda and self.device.type == "cuda")
        self.dali_device = "mixed" if self.mixed else "cpu"
        reason = {"gpu": "asked for", "cpu": "asked for"}.get(want, "CUDA available" if self.mixed else "no CUDA device")
        log.info("dali: %s decoding (%s)%s; RandAugment and normalisation on %s", self.dali_device, reason,
                 ", crop on the GPU" if self.mixed else ", all-CPU pipeline (device_id=None)", self.device)
        self.source = _PlanSource(ShardReader(self.manifest), self.labels)
        self.sizes = np.full((self.num_samples, 2), -1, np.int64)  # (height, width) per sample, read when first needed
        self._pipe = self._iterator = None
        self._finished = True
        self._epoch_of_pass = 0

    def _params(self, idx: np.ndarray, positions: np.ndarray, encoded: List[np.ndarray]) -> List[List[np.ndarray]]:
        """Per-sample external-source outputs of the training graph for the plan indices ``idx`` at the epoch's
        global ``positions``."""
        for k, i in enumerate(idx):
            if self.sizes[i, 0] < 0:
                self.sizes[i] = encoded_size(encoded[k])
        keys = sample_keys(self.cfg.run.seed, self._epoch_of_pass, positions)
        top, left, h, w = rrc_windows(keys, self.sizes[idx, 0], self.sizes[idx, 1], self.rrc_scale()).T
        anchor = np.stack([left, top], 1).astype(np.float32)
        shape = np.stack([w, h], 1).astype(np.float32)
        return [list(anchor), list(shape), list(flips(keys).astype(np.int32).reshape(-1, 1))]

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        d = self.cfg.data
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if self.mixed else None
        self.close_pipeline()
        pipe = _build_pipeline(self.source, self.stage, self.img_size, self.eval_resize(), self.dali_device,
                               self.batch_size, max(1, d.workers), device_id, self.cfg.run.seed * 1000 + self.rank,
                               max(1, d.batches_ahead))
        pipe.build()
        self._pipe = pipe
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], size=-1, auto_reset=False,
                                             prepare_first_batch=False)
        self._fresh = True

    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None or not self._finished:  # a pass left midway keeps prefetched batches: start anew
            self._build()
        self._epoch_of_pass = self.epoch
        self.source.start([indices[k:k + self.batch_size] for k in range(0, indices.size, self.batch_size)],
                          self.positions(indices), self._params if self.train else (lambda idx, pos, encoded: []))
        if not self._fresh:
            self._iterator.reset()
        self._fresh, self._finished = False, False
        positions, first = self.positions(indices), 0
        for out in self._iterator:  # the plan's batches in order
            images, labels = out[0]["images"], out[0]["labels"]  # uint8 [B,H,W,3]
            batch_positions, first = positions[first:first + images.shape[0]], first + images.shape[0]
            images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            yield self.device_stage(images, batch_positions), self._labels_to_device(labels)
        self._finished = True

    def close_pipeline(self) -> None:
        """Release the DALI pipeline and its threads."""
        iterator, pipe, self._iterator, self._pipe = self._iterator, self._pipe, None, None
        del iterator
        if pipe is not None:
            del pipe
            gc.collect()  # DALI joins its worker threads when the pipeline object is destroyed

    def close(self) -> None:
        super().close()
        self.close_pipeline()
        self._finished = True

"""torch backend: the webdataset shards decoded by torchvision — batched nvJPEG on CUDA — and cropped on the device.

Needs nothing beyond torch and torchvision. Per batch of the sampler's plan (the same plan as the ffcv and dali
backends): the encoded bytes are read by offset (:class:`~fastlivt.data.shards.ShardReader`), decoded in one
``torchvision.io.decode_jpeg(list, device=...)`` call, cropped and resized per sample with antialiased bicubic
interpolation, mirrored, and normalised, all on the loader's device (:mod:`fastlivt.data.device_decode`). Every random
choice is a function of (run.seed, epoch, position in the epoch) (:mod:`fastlivt.data.sample_rng`), so the batches
do not depend on data.workers, the world size or a resume.

Where the work runs (logged once per loader):

* CUDA: data.workers ``DataLoader`` processes read the bytes; a background thread decodes and crops each batch on a
  side CUDA stream, ``data.batches_ahead`` batches ahead of the training step.
* CPU: the same code on CPU tensors, run whole in the data.workers processes (in the background thread when 0).
* finetune with ``data.auto_augment``: timm's RandAugment per sample follows the crop wherever the crop runs
  (:mod:`fastlivt.data.device_randaugment`; the policy's draws from the same triple, bicubic as timm's
  ``create_transform(interpolation='bicubic')``).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastlivt.data import device_crop as dc
from fastlivt.data import device_decode as dd
from fastlivt.data import device_randaugment as dra
from fastlivt.data.base import EpochLoader
from fastlivt.data.device_stage import DeviceStage
from fastlivt.data.sample_rng import train_params
from fastlivt.data.shards import ShardReader
from fastlivt.logs import get_logger

Batch = Tuple[torch.Tensor, torch.Tensor]
log = get_logger(__name__)


class Augmenter:
    """decoded uint8 ``[3,H,W]`` images of the samples at ``positions`` of ``epoch`` -> uint8 ``[B,3,S,S]``
    (picklable): the shared device crop (:mod:`fastlivt.data.device_crop`), then RandAugment for finetune."""

    def __init__(self, stage: str, size: int, seed: int, rrc_scale: Sequence[float], eval_resize: int,
                 rand_augment: Optional[dra.RandAugmentPolicy] = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.stage, self.size, self.seed, self.rrc_scale = stage, size, seed, tuple(rrc_scale)
        self.eval_resize = eval_resize
        # timm's RandAugment per sample: the RandAugment half of the stage every backend shares
        self.rand_augment = DeviceStage(mean, std, torch.device("cpu"), seed, rand_augment) if rand_augment else None

    def __call__(self, images: List[torch.Tensor], positions: np.ndarray, epoch: int) -> torch.Tensor:
        if self.stage == "eval":
            sizes = [(im.shape[1], im.shape[2]) for im in images]
            return dc.resize_center_crop(images, sizes, self.eval_resize, self.size)
        heights = np.array([im.shape[1] for im in images])
        widths = np.array([im.shape[2] for im in images])
        p = train_params(self.seed, epoch, positions, heights, widths, self.rrc_scale)
        out = dc.crop_resize(images, p.windows, p.flip, self.size)
        if self.rand_augment is not None:  # timm's order: crop, flip, RandAugment (the stage every backend shares)
            ra = self.rand_augment
            out = ra.augment(out, ra.draws(epoch, positions, out.device)).contiguous()
        return out


class ShardBatches(Dataset):
    """Item k = batch k of the current plan: ``(encoded bytes concatenated, their sizes, names, positions, labels)``
    when ``decode_here`` is False, otherwise ``(uint8 [B,3,S,S] images, labels)`` decoded and augmented on the CPU (in the worker)."""

    def __init__(self, reader: ShardReader, labels: np.ndarray, augment: Augmenter, decode_here: bool):
        self.reader, self.labels, self.augment, self.decode_here = reader, labels, augment, decode_here
        self.batches: List[Tuple[np.ndarray, np.ndarray]] = []  # (sample indices, their positions in the epoch)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def name(self, i: int) -> str:
        return f"{self.reader.paths[int(self.reader.shard[i])]}: member {i:09d}.jpg (sample {i})"

    def __getitem__(self, k: int):
        idx, positions = self.batches[k]
        arrays = [self.reader[int(i)] for i in idx]
        names = [self.name(int(i)) for i in idx]
        labels = torch.from_numpy(self.labels[idx].astype(np.int64))
        if not self.decode_here:  # one buffer: a worker hands over one shared-memory block, not B of them
            sizes = torch.tensor([a.size for a in arrays], dtype=torch.int64)
            return torch.from_numpy(np.concatenate(arrays)), sizes, names, torch.from_numpy(positions), labels
        images = dd.decode_batch([torch.from_numpy(a) for a in arrays], names, torch.device("cpu"))
        return self.augment(images, positions, self.epoch), labels


class TorchLoader(EpochLoader):
    backend = "torch"

    def __init__(self, cfg, split, stage, device=None, rank=0, world=1):
        super().__init__(cfg, split, stage, device, rank, world)
        d = cfg.data
        ra = self.rand_augment
        self.augment = Augmenter(stage, self.img_size, cfg.run.seed, self.rrc_scale(), self.eval_resize(), ra,
                                 d.mean, d.std)
        self.workers = max(0, int(d.workers))
        self.device_decode = self.device.type == "cuda"
        self.dataset = ShardBatches(ShardReader(self.manifest), self.labels, self.augment,
                                    decode_here=not self.device_decode)
        where_ra = "" if ra is None else f" + timm RandAugment {self.auto_augment} per sample"
        self.path = (f"nvJPEG decode + crop{where_ra} on {self.device}" if self.device_decode else
                     f"CPU decode + crop{where_ra} (CPU tensors)")
        where = f"{self.workers} DataLoader workers" if self.workers else "a background thread"
        log.info("torch loader: %s, host work in %s, normalised on %s", self.path, where, self.device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------------------------------------ one batch
    def _finish(self, item) -> Tuple[torch.Tensor, torch.Tensor]:
        """A DataLoader item -> (normalised images, labels) on the device (runs on the side stream on CUDA)."""
        if self.device_decode:
            blob, sizes, names, positions, labels = item
            images = dd.decode_batch(list(torch.split(blob, sizes.tolist())), names, self.device)
            images = self.augment(images, positions.numpy(), self.dataset.epoch)
        else:
            images, labels = item
            images = images.to(self.device, non_blocking=True)
        return self.normalize(images), labels

    def _finish_on_stream(self, item):
        if self._stream is None:
            return self._finish(item), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            # nvJPEG writes on its own stream into memory allocated on this one: let earlier work here finish first
            self._stream.synchronize()
            batch = self._finish(item)
            done = torch.cuda.Event()
            done.record(self._stream)
        return batch, done

    def _hand_over(self, batch, done) -> Batch:
        images, labels = batch
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            images.record_stream(current)
        return images, self._labels_to_device(labels)

    # ------------------------------------------------------------------------------------------------ one epoch
    def _iterate(self, indices: np.ndarray) -> Iterator[Batch]:
        positions = self.positions(indices)
        self.dataset.batches = [(indices[k:k + self.batch_size], positions[k:k + self.batch_size])
                                for k in range(0, indices.size, self.batch_size)]
        self.dataset.epoch = self.epoch
        loader = DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda" and not self.device_decode,
                            prefetch_factor=max(1, self.cfg.data.batches_ahead) if self.workers else None)
        items = iter(loader)  # starts the worker processes here, in the caller's thread
        ready: "queue.Queue" = queue.Queue(maxsize=max(1, self.cfg.data.batches_ahead))
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(items, ready, stop), name="torch-loader", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise payload
                yield self._hand_over(*payload)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
            del items  # shuts the worker processes down

    def _produce(self, items, ready: "queue.Queue", stop: threading.Event) -> None:
        def put(entry) -> bool:
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for item in items:
                if stop.is_set() or not put(("batch", self._finish_on_stream(item))):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))

    def describe(self) -> str:
        return f"{super().describe()}, {self.path}"

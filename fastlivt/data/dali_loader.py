"""DALI backend: encoded images from the webdataset shards, decoded and augmented by a DALI pipeline.

The sampler's plan enters through ``fn.external_source``: a callable that hands DALI the next batch of encoded bytes
(read by offset, :class:`~fastlivt.data.shards.ShardReader`) and int32 labels, and raises ``StopIteration`` at the end
of the plan, so an epoch is exactly the plan (a smaller last batch when not drop_last) and nothing spills over.

Device: with ``data.dali_device`` = auto and CUDA available (and a CUDA training device), decoding is ``mixed``
(nvJPEG) and resizing, RandAugment and normalisation run on the GPU; otherwise the whole graph is CPU
(``device_id=None``). ``dali_device=gpu`` without CUDA is an error. The choice is logged.

Augmentation: ``decoders.image_random_crop`` (area data.rrc_scale, aspect 3/4..4/3) + bicubic resize + mirror, or
``decoders.image`` + shorter-side bicubic resize + center crop (eval); ``crop_mirror_normalize`` makes float CHW.
finetune adds DALI's ``auto_aug.rand_augment`` with timm's n and m (``num_magnitude_bins=11`` makes DALI's bin m
the same magnitude as timm's m/10) and the 'increasing' suite for ``inc1`` (``monotonic_mag``). DALI's RandAugment
always applies its n ops (its suite holds 'identity') at the fixed magnitude: timm's per-op probability (``p``,
0.5) and magnitude noise (``mstd``) have no DALI equivalent, so those two settings are logged and not reproduced.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from fastlivt.data.loader import EpochLoader, log
from fastlivt.data.shards import ShardReader


def parse_rand_augment(config: str) -> Dict[str, float]:
    """timm's 'rand-m9-mstd0.5-inc1' -> {'n': 2, 'm': 9, 'mstd': 0.5, 'inc': 1, 'p': 0.5} (timm's defaults filled in)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"data.auto_augment: only RandAugment policies ('rand-...') are supported, got {config!r}")
    out: Dict[str, float] = {"n": 2, "m": 10, "mstd": 0.0, "inc": 0, "p": 0.5}
    for part in parts[1:]:
        key, value = (re.split(r"(\d.*)", part) + ["", ""])[:2]  # timm's own parsing: letters, then a number
        if key not in out or not value:
            raise ValueError(f"data.auto_augment: unsupported RandAugment setting {part!r} in {config!r}")
        out[key] = float(value)
    return out


class _PlanSource:
    """The external_source callable: the next batch of (encoded images, labels) of ``batches``; StopIteration at the end."""

    def __init__(self, reader: ShardReader, labels: np.ndarray):
        self.reader, self.labels = reader, labels.astype(np.int32)
        self.batches: List[np.ndarray] = []
        self.next = 0

    def start(self, batches: List[np.ndarray]) -> None:
        self.batches, self.next = batches, 0

    def __call__(self) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        if self.next >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.next]
        self.next += 1
        return [self.reader[int(i)] for i in idx], [self.labels[i:i + 1] for i in idx]


def _build_pipeline(source, stage: str, size: int, mean, std, rrc_scale, resize: int, rand_aug, decode: str,
                    batch_size: int, num_threads: int, device_id, seed: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=rand_aug is not None)
    def pipeline():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
        mirror = False
        if stage == "eval":
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_CUBIC)
        else:
            images = fn.decoders.image_random_crop(jpegs, device=decode, output_type=types.RGB,
                                                   random_area=list(rrc_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC)
            mirror = fn.random.coin_flip(probability=0.5)
            if rand_aug is not None:
                from nvidia.dali.auto_aug import rand_augment

                images = rand_augment.rand_augment(
                    images, n=int(rand_aug["n"]), m=int(round(rand_aug["m"])), num_magnitude_bins=11,
                    shape=[size, size], max_translate_rel=0.45, monotonic_mag=bool(rand_aug["inc"]),
                    fill_value=int(round(255 * sum(mean) / 3)))
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                          mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror)
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
            raise ValueError(f"data.dali_device must be auto, cpu or gpu, got {want!r}")
        cuda = torch.cuda.is_available() and GetCUDADeviceCount() > 0
        if want == "gpu" and not cuda:
            raise RuntimeError("data.dali_device=gpu asks for nvJPEG ('mixed') decoding, but no CUDA device is "
                               "available (torch.cuda.is_available() is False); use dali_device=cpu or auto")
        self.mixed = want == "gpu" or (want == "auto" and cuda and self.device.type == "cuda")
        self.dali_device = "mixed" if self.mixed else "cpu"
        reason = {"gpu": "asked for", "cpu": "asked for"}.get(want, "CUDA available" if self.mixed else "no CUDA device")
        log.info("dali: %s decoding (%s)%s", self.dali_device, reason,
                 ", augmentation on the GPU" if self.mixed else ", all-CPU pipeline (device_id=None)")
        self.rand_aug = parse_rand_augment(self.auto_augment) if self.auto_augment else None
        if self.rand_aug and (self.rand_aug["mstd"] or self.rand_aug["p"] != 1.0):
            log.info("dali: RandAugment n=%d m=%d; timm's mstd=%g and per-op p=%g have no DALI equivalent",
                     self.rand_aug["n"], self.rand_aug["m"], self.rand_aug["mstd"], self.rand_aug["p"])
        self.source = _PlanSource(ShardReader(self.manifest), self.labels)
        self._iterator = None
        self._finished = True

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        d = self.cfg.data
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if self.mixed else None
        # (DALI's auto_aug warns about its own deprecated fn.experimental aliases; harmless)
        pipe = _build_pipeline(self.source, self.stage, self.img_size, d.mean, d.std, self.rrc_scale(),
                               self.eval_resize(), self.rand_aug, self.dali_device, self.batch_size,
                               max(1, d.workers), device_id, self.cfg.run.seed * 1000 + self.rank,
                               max(1, d.batches_ahead))
        pipe.build()
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], size=-1, auto_reset=False,
                                             prepare_first_batch=False)
        self._fresh = True

    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None or not self._finished:  # a pass left midway keeps prefetched batches: start anew
            self._build()
        self.source.start([indices[k:k + self.batch_size] for k in range(0, indices.size, self.batch_size)])
        if not self._fresh:
            self._iterator.reset()
        self._fresh, self._finished = False, False
        for out in self._iterator:
            images, labels = out[0]["images"], out[0]["labels"]
            yield images.to(self.device, non_blocking=True), self._labels_to_device(labels)
        self._finished = True
